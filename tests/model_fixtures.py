"""Helpers shared by the predict, export and serve tests: one small trained checkpoint and real CIFAR-10 test JPEGs,
each made once per test session (the test modules wrap them in session-scoped fixtures), and `Server`, a real
`cifar-cnn serve` subprocess on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import httpx
import pytest

from .conftest import CLASSES, ROOT, SHARED_ARCHIVE, make_images, write_official_batches

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`cifar-cnn serve` in a subprocess on 127.0.0.1, stopped when the block ends."""

    def __init__(self, checkpoint: Path, log: Path, *options: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        cmd = [sys.executable, "-m", "cifar_cnn", "serve", str(checkpoint), "--port", str(self.port), *options]
        self.log = log
        self.proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}: {log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError(f"server did not answer /health within 60 s: {log.read_text()}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)
