"""Helpers shared by the predict, export and serve tests: one small trained checkpoint and real CIFAR-10 test JPEGs,
each made once per test session (the test modules wrap them in session-scoped fixtures)."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from .conftest import CLASSES, SHARED_ARCHIVE, make_images, write_official_batches

_cache: dict[str, Path] = {}


def tiny_checkpoint(factory: pytest.TempPathFactory) -> Path:
    """best.pt of seed_cnn trained 3 epochs on the tiny generated data (about 4 s), with run.json beside it.

    Trained long enough that its logits differ clearly between classes, so top-1 comparisons are not decided by
    rounding between near-equal logits."""
    if "checkpoint" not in _cache:
        from cifar_cnn import resolve_config, train

        root = factory.mktemp("tiny-model")
        x, y = make_images(60, seed=1)
        tx, ty = make_images(20, seed=2)
        data = write_official_batches(root / "cifar-10-batches-py", x, y, tx, ty)
        config = resolve_config(
            "seed", None, dict(epochs=3, batch_size=32, lr=0.05, device="cpu", precision="fp32", val_split=0.2)
        )
        train(config, str(data), root / "run", home=root / "home", log=lambda m: None, threads=1)
        _cache["checkpoint"] = root / "run" / "best.pt"
        _cache["checkpoint_data"] = data
    return _cache["checkpoint"]


def checkpoint_data(factory: pytest.TempPathFactory) -> Path:
    """The generated official-format folder the tiny checkpoint was trained on."""
    tiny_checkpoint(factory)
    return _cache["checkpoint_data"]


def real_test_tree(factory: pytest.TempPathFactory, per_class: int = 100) -> Path:
    """An image-folder tree ROOT/test/<class>/NNNN.jpg with the first `per_class` test JPEGs of every class of the
    shared CIFAR-10 archive (ROOT/train/<class>/0000.jpg too, since a data set needs a train split), extracted in
    one streaming pass over the archive."""
    key = f"real-{per_class}"
    if key not in _cache:
        if not SHARED_ARCHIVE.is_file():
            pytest.fail(f"the shared data archive is missing: {SHARED_ARCHIVE}")
        root = factory.mktemp("cifar10-real")
        with tarfile.open(SHARED_ARCHIVE, "r|gz") as tf:
            for member in tf:
                parts = member.name.split("/")
                if not member.isfile() or len(parts) != 3 or parts[1] not in CLASSES:
                    continue
                index = int(Path(parts[2]).stem)
                if (parts[0] == "test" and index < per_class) or (parts[0] == "train" and index == 0):
                    dest = root / member.name
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(tf.extractfile(member).read())
        _cache[key] = root
    return _cache[key]
