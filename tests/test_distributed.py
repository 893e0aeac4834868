"""Distributed data-parallel training: shards, loss weights, and 2 torchrun processes on CPU (gloo, 127.0.0.1) against
one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cifar_cnn import load_checkpoint
from cifar_cnn.data.pipeline import Augment, TensorLoader
from cifar_cnn.distributed import DistContext, ShardedLoader, shard_bounds
from cifar_cnn.errors import CifarCnnError

from .conftest import ROOT, run_cli


def _loader(n: int, batch_size: int, augment: Augment | None = None, drop_last: bool = False) -> TensorLoader:
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    y = torch.arange(n)
    return TensorLoader(x, y, batch_size, shuffle=True, drop_last=drop_last, augment=augment, seed=3)


@pytest.mark.parametrize(("world", "n"), [(2, 50), (3, 51)])
def test_shards_make_up_the_single_process_batches(world: int, n: int) -> None:
    aug = Augment(flip=True, translate=1, cutout=2)
    base = _loader(n, 8, aug)
    for epoch in (0, 1):
        single = list(base.batches(epoch))
        shards = [list(ShardedLoader(base, r, world).batches(epoch)) for r in range(world)]
        assert all(len(s) == len(single) == 7 for s in shards)
        for step, x, y in single:
            assert torch.equal(torch.cat([s[step][2] for s in shards]), y)
            assert torch.equal(torch.cat([s[step][1] for s in shards]), x)  # augmented alike
    # a new order every epoch, the same for every rank and every run
    assert not torch.equal(base.order(0), base.order(1))
    assert torch.equal(_loader(n, 8).order(1), base.order(1))


def test_loss_weights_turn_the_average_of_shard_means_into_the_global_mean() -> None:
    base = _loader(50, 8)  # last global batch: 2 images
    world = 2
    per_image = torch.rand(50, dtype=torch.float64)
    for step, _, y in base.batches(0):
        weighted = []
        for r in range(world):
            lo, hi = shard_bounds(len(y), r, world)
            local = per_image[y[lo:hi]]
            weighted.append(local.mean() * ShardedLoader(base, r, world).loss_weight(step, len(local)))
        assert (sum(weighted) / world).item() == pytest.approx(per_image[y].mean().item())


def test_batches_smaller_than_the_world_are_refused() -> None:
    with pytest.raises(CifarCnnError, match="--drop-last"):
        ShardedLoader(_loader(49, 8), 0, 2)  # the last batch has 1 image
    with pytest.raises(CifarCnnError, match="batch_size"):
        ShardedLoader(_loader(50, 2), 0, 4)
    ShardedLoader(_loader(49, 8, drop_last=True), 0, 2)


def test_single_process_context_changes_nothing() -> None:
    ctx = DistContext()
    loader = _loader(10, 4)
    assert ctx.shard(loader) is loader and ctx.is_main and not ctx.active
    assert ctx.all_sum([1.0, 2.0]) == [1.0, 2.0] and ctx.any(True) and ctx.agreed(None) is None
    model = torch.nn.Linear(2, 2)
    assert ctx.wrap(model, torch.device("cpu")) is model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr", "127.0.0.1"]
    cmd += ["--master_port", str(_free_port()), "-m", "cifar_cnn", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_two_processes_train_like_one_and_resume(tmp_path: Path, official_dir: Path) -> None:
    """seed_cnn, dropout 0, no augmentation: 2 ranks x 16 images per step = one process with batch 32."""
    common = ["--data", str(official_dir), "--batch-size", "32", "--subset", "200", "--dropout", "0", "--lr", "0.05"]
    common += ["--momentum", "0.9", "--precision", "fp32", "--device", "cpu", "--threads", "1", "--no-progress"]
    common += ["--no-report"]
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    first = _torchrun("train", *common, "--epochs", "1", "--out", str(ddp))
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("epoch 1/1") == 1  # only rank 0 logs
    resume = ["--resume", str(ddp / "last.pt"), "--data", str(official_dir), "--epochs", "2", "--no-report"]
    second = _torchrun("train", *resume)
    assert second.returncode == 0, second.stderr[-3000:]
    one = run_cli("train", *common, "--epochs", "2", "--out", str(single))
    assert one.returncode == 0, one.stderr[-3000:]

    a, b = load_checkpoint(ddp / "last.pt"), load_checkpoint(single / "last.pt")
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"] == 10  # 160 images / 32 per global step, 2 epochs
    for key, value in b["model_state"].items():
        torch.testing.assert_close(a["model_state"][key], value, rtol=1e-4, atol=1e-5)
    for ra, rb in zip(a["history"], b["history"]):  # per-epoch metrics all-reduced over ranks
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-4)
        assert ra["train_acc"] == rb["train_acc"] and ra["val_acc"] == rb["val_acc"]
    # rank 0 alone wrote: the same files as a single-process run, no stray temporary files
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in single.iterdir())
    run = json.loads((ddp / "run.json").read_text())
    assert run["distributed"] == {"world_size": 2, "backend": "gloo"} and run["resumes"] == 1
    assert json.loads((ddp / "test_metrics.json").read_text())["num_images"] == 200


def test_accumulation_freezing_and_mixing_under_torchrun_match_one_process(tmp_path: Path, official_dir: Path) -> None:
    """2 ranks x 8 images per batch, 2 batches per update (DDP no_sync on the first), the body frozen in epoch 1 (the
    DDP wrapper is rebuilt when it unfreezes), mixup and cutmix drawn on the global batch: the weights equal one
    process's with the same settings."""
    common = ["--data", str(official_dir), "--batch-size", "16", "--accum-steps", "2", "--subset", "200"]
    common += ["--dropout", "0", "--lr", "0.05", "--momentum", "0.9", "--freeze-epochs", "1", "--epochs", "2"]
    common += ["--mixup-alpha", "0.4", "--cutmix-alpha", "1.0", "--label-smoothing", "0.1", "--clip-grad", "5"]
    common += ["--precision", "fp32", "--device", "cpu", "--threads", "1", "--no-progress", "--no-report"]
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    done = _torchrun("train", *common, "--out", str(ddp))
    assert done.returncode == 0, done.stderr[-3000:]
    one = run_cli("train", *common, "--out", str(single))
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = load_checkpoint(ddp / "last.pt"), load_checkpoint(single / "last.pt")
    for key, value in b["model_state"].items():
        torch.testing.assert_close(a["model_state"][key], value, rtol=1e-4, atol=1e-5)
    assert "training the head alone" in done.stdout and "the whole network trains" in done.stdout
