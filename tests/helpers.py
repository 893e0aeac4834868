"""Small helpers that several test files share (fixtures live in conftest.py)."""

from __future__ import annotations

from cifar_cnn import resolve_config
from cifar_cnn.config import TrainConfig

CHROMIUM = "/usr/bin/chromium"  # Debian's package; .ci/run installs it
CHROMIUM_ARGS = [  # no sandbox (root in a container), nothing fetched in the background
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def quiet(_: str) -> None:
    """A `log=` that prints nothing."""


def small_config(**overrides) -> TrainConfig:
    """The seed recipe made small and quick for the tiny data set: 2 epochs of batch 32 on the CPU in fp32, with
    flips, shifts and cutout on so that augmentation is part of what a test covers."""
    base = dict(
        epochs=2,
        batch_size=32,
        lr=0.02,
        momentum=0.9,
        device="cpu",
        precision="fp32",
        flip=True,
        translate=2,
        cutout=8,
        eval_batch_size=64,
    )
    base.update(overrides)
    return resolve_config("seed", None, base)
