"""Calibrated confidence: the temperature fit against a brute-force search and a known generating temperature, ECE
and reliability by hand, `cifar-cnn calibrate` on a deliberately over-confident model (ECE falls, predictions do
not change), the temperature used by predict, evaluate and serve, and `train --calibrate` with its held-out slice."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from cifar_cnn import resolve_config, train
from cifar_cnn.calibration import (
    calibration_metrics,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability,
    softmax,
)
from cifar_cnn.cli import main
from cifar_cnn.data import load_dataset, make_splits
from cifar_cnn.predict import Predictor

from .conftest import make_images, write_official_batches
from .model_fixtures import Server


def sampled_logits(n: int, temperature: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits / temperature): the temperature that fits them is known."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, size=(n, 10))
    p = softmax(logits, temperature)
    labels = (p.cumsum(1) > rng.random((n, 1))).argmax(1)
    return logits, labels


def test_fit_recovers_the_generating_temperature_and_beats_every_other() -> None:
    logits, labels = sampled_logits(20_000, 2.5)
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(2.5, rel=0.05)
    grid = np.linspace(0.5, 6, 2000)
    best = grid[np.argmin([nll(logits, labels, g) for g in grid])]  # brute force, independent of Newton's method
    assert t == pytest.approx(best, abs=0.01)
    assert nll(logits, labels, t) <= min(nll(logits, labels, g) for g in (t * 0.9, t * 1.1, 1.0))


def test_ece_and_reliability_by_hand() -> None:
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.55, 0.45]])
    labels = np.array([0, 1, 1, 0])
    # confidences 0.9 (right), 0.8 (wrong), 0.7 (right), 0.55 (right); 15 bins of width 1/15
    bins = reliability(probs, labels)
    counts = {round(b["lower"] * 15): b["count"] for b in bins if b["count"]}
    assert counts == {13: 1, 11: 1, 10: 1, 8: 1}
    want = (abs(1 - 0.9) + abs(0 - 0.8) + abs(1 - 0.7) + abs(1 - 0.55)) / 4  # one image per bin
    assert expected_calibration_error(probs, labels) == pytest.approx(want)
    m = calibration_metrics(np.log(probs), labels, 1.0)
    assert m["ece"] == pytest.approx(want) and m["uncalibrated"]["ece"] == pytest.approx(want)
    assert m["nll"] == pytest.approx(-np.mean(np.log([0.9, 0.2, 0.7, 0.55])))


@pytest.fixture(scope="module")
def overconfident(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """seed_cnn trained on noisy colour classes, with its last layer multiplied by 6: the same predictions, far
    more sure of them than its accuracy warrants."""
    root = tmp_path_factory.mktemp("overconfident")
    x, y = make_images(60, seed=1)
    tx, ty = make_images(30, seed=2)
    rng = np.random.default_rng(0)
    flip = rng.random(len(y)) < 0.3  # noisy labels keep the accuracy well below 100%
    y = np.where(flip, rng.integers(0, 10, len(y)), y)
    tflip = rng.random(len(ty)) < 0.3
    ty = np.where(tflip, rng.integers(0, 10, len(ty)), ty)
    data = write_official_batches(root / "cifar-10-batches-py", x, y, tx, ty)
    config = resolve_config("seed", None, dict(epochs=4, batch_size=32, lr=0.05, device="cpu", precision="fp32"))
    train(config, str(data), root / "run", home=root / "home", log=lambda m: None, threads=1)
    ckpt = torch.load(root / "run" / "best.pt", weights_only=True)
    ckpt["model_state"]["fc2.weight"] *= 6
    ckpt["model_state"]["fc2.bias"] *= 6
    torch.save(ckpt, root / "run" / "best.pt")
    return {"checkpoint": root / "run" / "best.pt", "data": data, "root": root}


def _json(capsys: pytest.CaptureFixture, argv: list[str]) -> dict:
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_calibrate_lowers_the_test_ece_of_an_overconfident_model(
    overconfident: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ck = overconfident["checkpoint"]
    copy = tmp_path / "calibrated.pt"
    before_bytes = ck.read_bytes()
    fitted = _json(capsys, ["calibrate", str(ck), "--out", str(copy), "--json", "--threads", "1", "--device", "cpu"])
    assert ck.read_bytes() == before_bytes, "--out must leave the original checkpoint as it was"
    assert fitted["split"] == "val" and 100 < fitted["num_images"] < 140 and fitted["temperature"] > 2
    assert fitted["after"]["nll"] < fitted["before"]["nll"]

    # fp32 as the Predictor below computes (on a CPU with bf16, --precision auto would evaluate in bf16)
    fp32 = ["--json", "--threads", "1", "--device", "cpu", "--precision", "fp32"]
    raw = _json(capsys, ["evaluate", str(ck), *fp32])
    cal = _json(capsys, ["evaluate", str(copy), *fp32])
    assert raw["temperature"] == 1.0 and cal["temperature"] == pytest.approx(fitted["temperature"])
    assert cal["ece"] < raw["ece"] - 0.05 and cal["nll"] < raw["nll"], (raw["ece"], cal["ece"])
    assert cal["uncalibrated"]["ece"] == pytest.approx(raw["ece"]) and cal["accuracy"] == raw["accuracy"]

    # independent: softmax(logits / T) of the model's own logits on the test split
    predictor = Predictor.from_checkpoint(copy, threads=1)
    ds = load_dataset(str(overconfident["data"]), log=lambda m: None)
    logits = predictor.logits(np.asarray(ds.test_images))
    want = expected_calibration_error(softmax(logits, fitted["temperature"]), ds.test_labels)
    assert cal["ece"] == pytest.approx(want, abs=1e-6)
    rows = predictor.predict(np.asarray(ds.test_images[:5]), top_k=2)
    p = softmax(logits[:5], fitted["temperature"])
    assert [r["probability"] for r in rows] == pytest.approx(p.max(1).tolist(), abs=1e-9)
    assert [r["label"] for r in rows] == [ds.classes[i] for i in p.argmax(1)]  # the labels do not change


def test_calibrate_replaces_the_checkpoint_and_serve_applies_it(
    overconfident: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    ck = tmp_path / "best.pt"
    ck.write_bytes(overconfident["checkpoint"].read_bytes())
    (tmp_path / "run.json").write_text((overconfident["root"] / "run" / "run.json").read_text())
    assert main(["calibrate", str(ck), "--threads", "1", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    printed = out.strip().splitlines()[-1].split(": ", 1)[1]  # the command it prints, run exactly as printed
    assert printed == f"cifar-cnn evaluate {ck}"
    assert main([*printed.split()[1:], "--threads", "1", "--device", "cpu"]) == 0
    shown = capsys.readouterr().out
    assert "calibration: ECE" in shown and "with temperature" in shown
    t = torch.load(ck, weights_only=True)["temperature"]
    assert t > 2
    image = tmp_path / "x.png"
    from PIL import Image

    ds = load_dataset(str(overconfident["data"]), log=lambda m: None)
    Image.fromarray(np.asarray(ds.test_images[0]).transpose(1, 2, 0)).save(image)
    logits = Predictor.from_checkpoint(ck, threads=1).logits(np.asarray(ds.test_images[:1]))
    srv = Server(ck, tmp_path / "serve.log", "--threads", "1")
    try:
        answer = httpx.post(f"{srv.url}/predict", files={"file": image.open("rb")}, timeout=30).json()
        health = httpx.get(f"{srv.url}/health", timeout=10).json()
    finally:
        srv.stop()
    assert health["temperature"] == pytest.approx(t)
    assert answer["probability"] == pytest.approx(float(softmax(logits, t).max()), abs=1e-6)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--split", "test"], "--split test: fitting the temperature on the test split"),
        (["--split", "tset"], "--split must be one of test, val, train"),
        (["--out", "/nonexistent/dir/x.pt"], "folder /nonexistent/dir does not exist"),
    ],
)
def test_bad_calibrate_options_are_one_line(
    overconfident: dict, capsys: pytest.CaptureFixture, argv: list[str], fragment: str
) -> None:
    before = overconfident["checkpoint"].read_bytes()
    assert main(["calibrate", str(overconfident["checkpoint"]), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0], err
    assert overconfident["checkpoint"].read_bytes() == before


def test_calibration_slice_is_stratified_seeded_and_not_trained_on(tmp_path: Path) -> None:
    x, y = make_images(30, seed=1)
    data = write_official_batches(tmp_path / "d", x, y, x[:20], y[:20])
    ds = load_dataset(str(data), log=lambda m: None)
    a = make_splits(ds, 0.0, seed=3, calibration=50)
    b = make_splits(ds, 0.0, seed=3, calibration=50)
    c = make_splits(ds, 0.0, seed=4, calibration=50)
    assert len(a.calibration_labels) == 50 and len(a.train_labels) == 250
    assert np.bincount(a.calibration_labels).tolist() == [5] * 10
    flat = lambda imgs: {bytes(np.asarray(i)) for i in imgs}  # noqa: E731
    assert not flat(a.calibration_images) & flat(a.train_images), "a held-out image is also trained on"
    assert flat(a.calibration_images) == flat(b.calibration_images) != flat(c.calibration_images)
    assert make_splits(ds, 0.2, seed=3, calibration=50).calibration_labels is None  # a val split is used instead


def test_train_calibrate_on_all_images_holds_out_a_slice(tmp_path: Path) -> None:
    x, y = make_images(30, seed=1)
    tx, ty = make_images(10, seed=2)
    data = write_official_batches(tmp_path / "d", x, y, tx, ty)
    lines: list[str] = []
    config = resolve_config(
        "seed",
        None,
        dict(
            epochs=2,
            batch_size=32,
            device="cpu",
            precision="fp32",
            val_split=0.0,
            calibrate=True,
            calibration_images=60,
        ),
    )
    result = train(config, str(data), tmp_path / "run", home=tmp_path / "home", log=lines.append, threads=1)
    assert any("calibration: 60 training images" in line for line in lines)
    assert any(line.startswith("temperature ") and "fitted on 60 validation images" in line for line in lines)
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    assert ckpt["calibration"]["num_images"] == 60 and ckpt["temperature"] > 0
    metrics = json.loads((tmp_path / "run" / "test_metrics.json").read_text())
    assert metrics["temperature"] == pytest.approx(ckpt["temperature"]) and "uncalibrated" in metrics
    assert result.test.metrics["ece"] == pytest.approx(metrics["ece"])
