"""Own data sets: image folders with any number of classes and image sizes, a val/ folder as the validation split,
normalization statistics from the training images, stored in the checkpoint and used by evaluate. (Which statistics
and input size a run picks: test_presets.py.)"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from cifar_cnn import load_checkpoint
from cifar_cnn.data.sources import Dataset
from cifar_cnn.presets import channel_stats

from .conftest import make_images, run_cli
from .data_writers import write_image_folder


def test_resnet18_on_48px_images_of_three_classes_with_a_val_folder(tmp_path: Path) -> None:
    x, y = make_images(12, num_classes=3, size=40, seed=1)
    vx, vy = make_images(5, num_classes=3, size=40, seed=2)
    tx, ty = make_images(6, num_classes=3, size=40, seed=3)
    root = write_image_folder(Dataset(x, y, tx, ty, ["leaf", "rock", "sky"], vx, vy), tmp_path / "mine")
    out = tmp_path / "run"
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("model: resnet18\nmodel_args: {width: 8}\n")  # the seed recipe's model_args are seed_cnn's
    args = ["--data", str(root), "--config", str(cfg), "--image-size", "48", "--epochs", "2"]
    args += ["--batch-size", "12", "--lr", "0.05", "--precision", "fp32", "--threads", "1", "--no-report", "--json"]
    r = run_cli("train", *args, "--out", str(out))
    assert r.returncode == 0, r.stderr
    run = json.loads((out / "run.json").read_text())
    assert run["images"] == {"train": 36, "val": 15, "test": 18}  # val/ is the validation split, nothing held out
    assert run["normalization"] == "dataset"
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert len(rows) == 2 and all(r["val_acc"] for r in rows)
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["classes"] == ["leaf", "rock", "sky"] and ckpt["input_size"] == 48 and ckpt["num_classes"] == 3
    # the statistics of the training images, as the run computed them
    from cifar_cnn.data import load_dataset

    train48 = load_dataset(str(root), 48, log=lambda _: None).train_images
    assert train48.shape[1:] == (3, 40, 40)  # held at their own 40 px; batches are upscaled to 48 px per batch
    assert ckpt["mean"] == pytest.approx(list(channel_stats(train48)[0]), abs=1e-6)
    assert ckpt["model"] == {"name": "resnet18", "args": {"width": 8}}
    # evaluate rebuilds everything from the checkpoint: size, classes, normalization
    ev = run_cli("evaluate", str(out / "best.pt"), "--data", str(root), "--json", "--precision", "fp32")
    assert ev.returncode == 0, ev.stderr
    assert json.loads(ev.stdout)["accuracy"] == pytest.approx(json.loads(r.stdout)["test_metrics"]["accuracy"])
    val = run_cli("evaluate", str(out / "best.pt"), "--data", str(root), "--json", "--split", "val")
    assert json.loads(val.stdout)["num_images"] == 15
    # the weights work at 48 px as evaluate feeds them
    from cifar_cnn import model_from_checkpoint

    assert model_from_checkpoint(ckpt)(torch.zeros(2, 3, 48, 48)).shape == (2, 3)
    # seed_cnn's fc1 fixes its input at 32 px
    bad = run_cli("train", "--data", str(root), "--image-size", "48", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "takes only 32x32" in bad.stderr and not (tmp_path / "bad").exists()
