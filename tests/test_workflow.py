"""What `cifar-cnn train` does around the engine (cifar_cnn.workflow), called as a library: the report after training
from the test logits training computed (no second evaluation), TensorBoard's sample batch equal to the engine's own
augmentation at the run's input size, and run files that honour the umask."""

from __future__ import annotations

import io
import json
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_cnn import resolve_config
from cifar_cnn.data import load_dataset, make_splits
from cifar_cnn.data.pipeline import Augment, TensorLoader
from cifar_cnn.data.sources import Dataset
from cifar_cnn.report import build as report_build
from cifar_cnn.workflow import train_and_report

from .conftest import make_images
from .data_writers import write_image_folder

SIZE = 40  # not the model's default (32): the sample must follow the run's input size


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    x, y = make_images(24, num_classes=3, seed=1)
    tx, ty = make_images(8, num_classes=3, seed=2)
    return write_image_folder(Dataset(x, y, tx, ty, ["a", "b", "c"]), tmp_path / "tree")


def config(**extra):
    values = dict(
        model="resnet18", model_args={"width": 4}, image_size=SIZE, epochs=1, batch_size=16, device="cpu",
        precision="fp32", flip=True, alternate_flip=True, translate=3, eval_batch_size=64, val_split=0.25,
    )  # fmt: skip
    return resolve_config("seed", None, values | extra)


@pytest.fixture
def no_second_evaluation(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the report evaluated the checkpoint again")

    monkeypatch.setattr(report_build, "evaluate_checkpoint", refuse)


def test_report_and_tensorboard_after_training(tmp_path: Path, tree: Path, no_second_evaluation: None) -> None:
    out = tmp_path / "run"
    stream = io.StringIO()
    cfg = config()
    result, code = train_and_report(cfg, str(tree), out, tensorboard=True, stream=stream, threads=1)
    assert code == 0 and not result.interrupted
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["test_metrics"] == json.loads((out / "test_metrics.json").read_text()) == result["test_metrics"]
    assert result["report"] == str(out / "report" / "index.html") and Path(result["report"]).is_file()
    assert "epoch 1/1" in stream.getvalue()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0}).Reload()
    (tag,) = [t for t in events.Tags()["images"] if t.startswith("data/sample_batch")]
    grid = np.asarray(Image.open(io.BytesIO(events.Images(tag)[0].encoded_image_string)).convert("RGB"))
    assert grid.shape == (2 * SIZE, 8 * SIZE, 3)  # 16 images of the run's 40 px, 8 per row

    # the engine's augmentation, applied independently to the run's uint8 training images
    splits = make_splits(load_dataset(str(tree), SIZE, log=lambda _: None), cfg.val_split, cfg.seed)
    loader = TensorLoader(
        torch.from_numpy(splits.train_images[:]).float(),  # images of other sizes: the centre crops, as the engine
        torch.from_numpy(splits.train_labels),
        cfg.batch_size,
        shuffle=True,
        augment=Augment(cfg.flip, cfg.translate, cfg.cutout, cfg.alternate_flip),
        seed=cfg.seed,
        size=SIZE,  # images held smaller than the run's size are upscaled per batch, as the engine does
    )
    _, expected, _ = next(iter(loader.batches(0)))
    expected = expected.round().to(torch.uint8).numpy()
    tiles = [
        grid[r * SIZE : (r + 1) * SIZE, c * SIZE : (c + 1) * SIZE].transpose(2, 0, 1) for r in (0, 1) for c in range(8)
    ]
    # the run normalizes before upscaling, this reference after: the same pixels up to rounding at half grey levels
    diff = np.abs(np.stack(tiles).astype(np.int16) - expected.astype(np.int16))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99, (diff.max(), (diff == 0).mean())
    unaugmented = splits.train_images[torch.randperm(len(splits.train_labels), generator=loader_order(cfg.seed))[:16]]
    assert not np.array_equal(np.stack(tiles), unaugmented)  # the augmentation shows


def loader_order(seed: int) -> torch.Generator:
    from cifar_cnn.data.pipeline import derived_generator

    return derived_generator(seed, 0, -1)


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_run_files_honour_the_umask(
    tmp_path: Path, tree: Path, set_umask, umask: int, file_mode: int, dir_mode: int
) -> None:
    set_umask(umask)
    out = tmp_path / "run"
    train_and_report(config(), str(tree), out, stream=io.StringIO(), threads=1)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"best.pt", "last.pt", "metrics.csv", "run.json", "config.yaml", "index.html"}
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {p.name: oct(file_mode) for p in files}
    dirs = [out, *(p for p in out.rglob("*") if p.is_dir())]
    assert {str(p): oct(stat.S_IMODE(p.stat().st_mode)) for p in dirs} == {str(p): oct(dir_mode) for p in dirs}
