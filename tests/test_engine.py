"""The training engine: run directory contents, metrics, best/last checkpoints, exact resume."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cifar_cnn import evaluate_checkpoint, load_checkpoint, model_from_checkpoint, train
from cifar_cnn.data import load_dataset, make_splits
from cifar_cnn.errors import CifarCnnError
from cifar_cnn.rundir import RUN_FILES

from .helpers import quiet, small_config


def test_run_directory_contents(tmp_path: Path, official_dir: Path) -> None:
    out = tmp_path / "run"
    result = train(small_config(), str(official_dir), out, log=quiet, threads=1)
    assert sorted(p.name for p in out.iterdir()) == sorted(RUN_FILES)
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert list(rows[0]) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds"]
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["batch_size"] == 32 and cfg["recipe"] == "seed" and cfg["cutout"] == 8
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["torch_version"] == str(torch.__version__) and run["threads"] == 1
    assert run["end_time"] and run["device"] == "cpu" and run["package_version"]
    # best.pt holds the epoch with the lowest validation loss
    best = load_checkpoint(out / "best.pt")
    assert best["epoch"] == 1 + int(np.argmin([float(r["val_loss"]) for r in rows]))
    assert load_checkpoint(out / "last.pt")["epoch"] == 2
    # test_metrics.json is what evaluate prints for best.pt
    again = evaluate_checkpoint(out / "best.pt", str(official_dir), device="cpu", precision="fp32", log=quiet)
    stored = json.loads((out / "test_metrics.json").read_text())
    assert (
        stored["accuracy"] == pytest.approx(again["accuracy"])
        and stored["confusion_matrix"] == again["confusion_matrix"]
    )
    assert result["test_metrics"]["num_images"] == 200


def test_validation_loss_is_the_mean_over_validation_images(tmp_path: Path, official_dir: Path) -> None:
    """Recompute the last epoch's validation loss independently, image by image, from last.pt."""
    out = tmp_path / "run"
    train(small_config(epochs=1), str(official_dir), out, log=quiet, threads=1)
    ckpt = load_checkpoint(out / "last.pt")
    model = model_from_checkpoint(ckpt)
    splits = make_splits(load_dataset(str(official_dir), log=quiet), 0.2, 0)
    losses = []
    with torch.no_grad():
        for img, label in zip(splits.val_images, splits.val_labels):
            x = (torch.from_numpy(img).float()[None] / 255 - 0.5) / 0.5
            losses.append(torch.nn.functional.cross_entropy(model(x), torch.tensor([label])).item())
    row = next(csv.DictReader((out / "metrics.csv").open()))
    assert float(row["val_loss"]) == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert len(losses) == 120  # 20% of 600


def test_resume_is_bit_identical(tmp_path: Path, official_dir: Path) -> None:
    """Two epochs straight == one epoch, stop, resume, one more epoch (shuffling, dropout, augmentation on)."""
    straight = tmp_path / "straight"
    train(small_config(epochs=2), str(official_dir), straight, log=quiet, threads=1)
    part = tmp_path / "part"
    train(small_config(epochs=1), str(official_dir), part, log=quiet, threads=1)
    cfg = load_checkpoint(part / "last.pt")["config"]
    assert cfg["epochs"] == 1
    from cifar_cnn.engine import resume_config

    resumed_cfg = resume_config(load_checkpoint(part / "last.pt"), {"epochs": 2})
    train(resumed_cfg, str(official_dir), part, resume=part / "last.pt", log=quiet, threads=1)
    a = load_checkpoint(straight / "last.pt")["model_state"]
    b = load_checkpoint(part / "last.pt")["model_state"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows_a = list(csv.DictReader((straight / "metrics.csv").open()))
    rows_b = list(csv.DictReader((part / "metrics.csv").open()))
    assert [r["epoch"] for r in rows_b] == ["1", "2"]
    assert [r["val_loss"] for r in rows_a] == [r["val_loss"] for r in rows_b]


def test_resume_inside_an_epoch_is_bit_identical(tmp_path: Path, official_dir: Path) -> None:
    straight = tmp_path / "straight"
    train(small_config(epochs=2), str(official_dir), straight, log=quiet, threads=1)
    part = tmp_path / "part"
    calls = {"n": 0}

    def stop_after_20_steps() -> bool:
        calls["n"] += 1
        return calls["n"] >= 20  # polled after every step (15 per epoch) and after each epoch: inside epoch 2

    result = train(
        small_config(epochs=2), str(official_dir), part, log=quiet, threads=1, should_stop=stop_after_20_steps
    )
    assert result["interrupted"]
    ckpt = load_checkpoint(part / "last.pt")
    assert ckpt["epoch"] == 1 and 0 < ckpt["batch_in_epoch"] < 15
    assert not (part / "test_metrics.json").exists()
    train(small_config(epochs=2), str(official_dir), part, resume=part / "last.pt", log=quiet, threads=1)
    a = load_checkpoint(straight / "last.pt")
    b = load_checkpoint(part / "last.pt")
    for k in a["model_state"]:
        assert torch.equal(a["model_state"][k], b["model_state"][k]), k
    assert a["history"][1]["train_loss"] == pytest.approx(b["history"][1]["train_loss"], rel=1e-12)


def test_no_validation_split_best_is_final(tmp_path: Path, official_dir: Path) -> None:
    out = tmp_path / "run"
    train(small_config(epochs=1, val_split=0.0), str(official_dir), out, log=quiet, threads=1)
    best = load_checkpoint(out / "best.pt")
    assert "final weights" in best["note"]
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert rows[0]["val_loss"] == ""


def test_refuses_non_empty_out(tmp_path: Path, official_dir: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CifarCnnError, match="not empty"):
        train(small_config(epochs=1), str(official_dir), out, log=quiet)
    train(small_config(epochs=1), str(official_dir), out, log=quiet, overwrite=True, threads=1)
    assert (out / "keep.txt").read_text() == "mine" and (out / "best.pt").is_file()


def test_learns_something(tmp_path: Path, official_dir: Path) -> None:
    """Classes differ in mean colour: a few epochs must beat chance (10%) by far."""
    out = tmp_path / "run"
    res = train(small_config(epochs=3, cutout=0, translate=0), str(official_dir), out, log=quiet, threads=1)
    assert res["test_metrics"]["accuracy"] > 0.5
