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


# ---- several nodes (issue 17): two torchrun agents on 127.0.0.1, one process each --------------------------------


def _node_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"), "PYTHONUNBUFFERED": "1"}


def _nodes(form: str, args: list[str]) -> list[subprocess.Popen]:
    """Two torchrun agents started as separate nodes of one job, with the same command: the static form (--node_rank
    and a master address) or the c10d rendezvous (an endpoint and a job id; torchrun assigns the ranks)."""
    port = _free_port()
    procs = []
    for node in (0, 1):
        launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1"]
        if form == "static":
            launch += ["--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port)]
        else:
            launch += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "job17"]
        procs.append(
            subprocess.Popen(
                [*launch, "-m", "cifar_cnn", *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_node_env(),
            )
        )
    return procs


def _finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str, str]]:
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append((proc.returncode, out, err))
    return results


MULTI_NODE = ["--batch-size", "32", "--subset", "200", "--dropout", "0", "--lr", "0.05", "--momentum", "0.9"]
MULTI_NODE += ["--precision", "fp32", "--device", "cpu", "--threads", "1", "--no-progress", "--no-report"]


@pytest.mark.parametrize("form", ["static", "c10d"])
def test_two_nodes_train_like_one_process_and_resume(tmp_path: Path, official_dir: Path, form: str) -> None:
    """Both nodes get the same command and the same --out (a shared folder): only rank 0 checks, creates and writes
    it. One epoch, then a resume to two under two nodes again: the weights equal one process's two epochs."""
    ddp, single = tmp_path / "ddp", tmp_path / "single"
    common = ["--data", str(official_dir), *MULTI_NODE]
    for rc, _out, err in _finish(_nodes(form, ["train", *common, "--epochs", "1", "--out", str(ddp)])):
        assert rc == 0, err[-3000:]
    resume = ["train", "--resume", str(ddp / "last.pt"), "--data", str(official_dir), "--epochs", "2", "--no-report"]
    results = _finish(_nodes(form, resume))
    for rc, _out, err in results:
        assert rc == 0, err[-3000:]
    said = [line for _, out, _ in results for line in out.splitlines() if line.startswith("epoch 2/2")]
    assert len(said) == 1, results  # rank 0 alone speaks
    one = run_cli("train", *common, "--epochs", "2", "--out", str(single))
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = load_checkpoint(ddp / "last.pt"), load_checkpoint(single / "last.pt")
    assert a["epoch"] == b["epoch"] == 2 and a["step"] == b["step"] == 10
    for key, value in b["model_state"].items():
        torch.testing.assert_close(a["model_state"][key], value, rtol=1e-4, atol=1e-5)
    assert sorted(p.name for p in ddp.iterdir()) == sorted(p.name for p in single.iterdir())
    run = json.loads((ddp / "run.json").read_text())
    assert run["distributed"] == {"world_size": 2, "backend": "gloo"} and run["resumes"] == 1


@pytest.mark.parametrize("fate", ["killed", "frozen"])
def test_a_lost_node_stops_the_other_with_one_line_and_the_run_resumes(
    tmp_path: Path, official_dir: Path, fate: str
) -> None:
    """Node 1 killed (kill -9 of its agent and its worker) or frozen (SIGSTOP: its sockets stay open, so only the
    timeout can tell) mid-run: node 0's worker stops within 60 s with a one-line error that says what happened and how
    to resume; last.pt is intact, and the printed command resumes it."""
    import signal
    import time

    ddp = tmp_path / "ddp"
    args = ["train", "--data", str(official_dir), *MULTI_NODE, "--epochs", "200", "--out", str(ddp)]
    procs = _nodes("static", [*args, "--dist-timeout", "20"])
    t0 = time.time()
    while not (ddp / "last.pt").exists():
        assert all(p.poll() is None for p in procs), _finish(procs)
        assert time.time() - t0 < 300
        time.sleep(0.05)
    time.sleep(1.0)
    how = "-KILL" if fate == "killed" else "-STOP"
    subprocess.run(["pkill", how, "-P", str(procs[1].pid)], check=False)  # node 1's worker
    procs[1].send_signal(signal.SIGKILL if fate == "killed" else signal.SIGSTOP)  # and its agent
    lost = time.time()
    try:
        out, err = procs[0].communicate(timeout=120)
    finally:
        subprocess.run(["pkill", "-KILL", "-P", str(procs[1].pid)], check=False)
        procs[1].kill()
        procs[1].communicate()
    assert time.time() - lost < 60, time.time() - lost
    assert procs[0].returncode != 0
    ours = [line for line in err.splitlines() if line.startswith("cifar-cnn: error:")]
    assert len(ours) == 1 and "lost contact with" in ours[0], err
    assert "Traceback" not in err.split(ours[0])[0], err  # torchrun's own report of the failed worker may follow
    command = ours[0].split("resume with: ", 1)[1].strip()
    assert command == f"cifar-cnn train --resume {ddp / 'last.pt'}"
    epoch = load_checkpoint(ddp / "last.pt")["epoch"]
    assert 1 <= epoch < 200
    resumed = run_cli("train", "--resume", str(ddp / "last.pt"), "--epochs", str(epoch + 1), "--no-report")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert load_checkpoint(ddp / "last.pt")["epoch"] == epoch + 1
