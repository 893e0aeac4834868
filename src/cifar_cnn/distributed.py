"""Distributed data-parallel training with PyTorch's own engine (torch.distributed + DistributedDataParallel).

Launch with torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for every process:

    torchrun --nproc_per_node=2 -m cifar_cnn train --data ... --out runs/ddp

How it divides the work (all of it decided here, so `engine.train` only asks "am I rank 0?"):
- backend: gloo on CPU, NCCL on CUDA (each process uses GPU LOCAL_RANK).
- `--batch-size` is the *global* batch: each optimizer step consumes batch_size images in all, rank r taking a
  contiguous r-th slice of the global batch that a single process would have taken at that step. The per-epoch
  order (and augmentation) comes from (seed, epoch, step) exactly as in one process, so the shards differ every epoch,
  are reproducible from the seed, and their union is the single-process batch. Each rank's loss is weighted by its
  share of the global batch, so the gradient DDP averages is exactly the single-process gradient: same global batch
  and LR give the same training (tested to float tolerance). Scale `--lr` with the global batch, not with the number
  of processes.
- batch norm: SyncBatchNorm on CUDA (statistics over the global batch); on CPU PyTorch has no SyncBatchNorm, so each
  rank normalizes with its own shard's statistics and DDP broadcasts rank 0's running statistics every step.
- validation, checkpoints, metrics.csv, run.json, logs and the test evaluation: rank 0 only (the others wait at the
  next step's all-reduce). Training loss and accuracy per epoch are all-reduced over ranks.
- Ctrl-C / SIGTERM: the stop flag is all-reduced after every step, so every rank stops at the same step and rank 0
  writes a resumable last.pt; `--resume` works under torchrun (any world size: the data order does not depend on it).
- dropout: each rank draws from its own generator, seeded from (seed, rank, epoch, step) at the start or resume.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime as dt
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from .data.pipeline import TensorLoader, derived_generator
from .errors import CifarCnnError

TIMEOUT_SECONDS = 1800.0  # how long a rank waits for the others (rank 0 validating and testing, a slow node)


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise CifarCnnError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def env_rank() -> int:
    """RANK as torchrun sets it (0 when not launched by torchrun)."""
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        raise CifarCnnError(f"RANK={os.environ['RANK']!r} is not a number") from None


@dataclass(frozen=True)
class DistContext:
    """This process's place in a distributed run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    owns_group: bool = False  # init_from_env created the process group, so finish() destroys it

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that validates and writes."""
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "backend": self.backend}

    # ---- placement -----------------------------------------------------------------------------------------------

    def local_device(self, device: torch.device) -> torch.device:
        """On CUDA each process uses its own GPU, LOCAL_RANK; CPU stays CPU."""
        if self.active and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def prepare_model(self, model: nn.Module, device: torch.device) -> nn.Module:
        """SyncBatchNorm on CUDA (call before building the optimizer: it replaces the batch-norm modules)."""
        if self.active and device.type == "cuda":
            return nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The model DDP-wrapped for training (unchanged when not distributed)."""
        if not self.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def seed_rank(self, seed: int, epoch: int, step: int) -> None:
        """Give this rank its own stream for dropout (ranks would otherwise draw the same masks)."""
        if self.active:
            g = derived_generator(seed, 7919 + self.rank, epoch, step)
            value = int(torch.randint(0, 2**62, (1,), generator=g).item())
            torch.manual_seed(value)

    def loss_weight(self, loader: Any, reduction: str = "mean") -> Callable[[int, int], float] | None:
        """For train_one_epoch: (step, images in this rank's batch) -> factor of its loss (None: one process)."""
        if not self.active:
            return None
        return lambda step, n: loader.loss_weight(step, n, reduction)

    def shard(self, loader: TensorLoader) -> TensorLoader | ShardedLoader:
        return ShardedLoader(loader, self.rank, self.world_size) if self.active else loader

    # ---- collectives ---------------------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def all_sum(self, values: list[float]) -> list[float]:
        """Sums over all ranks (float64), e.g. of per-epoch loss sums and counts."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._device())
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return [float(v) for v in t.cpu()]

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any (a stop request seen by one process stops them all)."""
        if not self.active:
            return flag
        return self.all_sum([1.0 if flag else 0.0])[0] > 0

    def finish(self) -> None:
        """End of training: wait for every rank (rank 0 tests and writes last), then leave the group if it is ours.
        Ranks that exit while another still uses the group can abort in gloo's teardown."""
        if self.active:
            tdist.barrier()
            if self.owns_group:
                shutdown()

    def agreed(self, should_stop: Callable[[], bool] | None) -> Callable[[], bool] | None:
        """A stop check that every rank answers alike (it is a collective: all ranks must call it together)."""
        if should_stop is None or not self.active:
            return should_stop
        return lambda: self.any(should_stop())


def context() -> DistContext:
    """The context of an initialized process group, else a single-process one."""
    if tdist.is_available() and tdist.is_initialized():
        return DistContext(
            rank=tdist.get_rank(),
            world_size=tdist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            backend=str(tdist.get_backend()),
        )
    return DistContext()


def init_from_env(device: torch.device, timeout: float | None = None) -> DistContext:
    """Join the process group torchrun describes in the environment (gloo on CPU, NCCL on CUDA).

    Without torchrun (WORLD_SIZE unset or 1) nothing happens. `timeout` (seconds, default TIMEOUT_SECONDS) bounds every
    wait for the other processes: a node that hangs stops the others with an error instead of a hang. The group is
    destroyed when the process exits.
    """
    if tdist.is_available() and tdist.is_initialized():
        return context()
    if env_world_size() <= 1:
        return DistContext()
    if not tdist.is_available():
        raise CifarCnnError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise CifarCnnError(f"WORLD_SIZE > 1 but {', '.join(missing)} unset: launch with torchrun")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise CifarCnnError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s): lower --nproc_per_node"
            )
        torch.cuda.set_device(local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    tdist.init_process_group(backend, timeout=dt.timedelta(seconds=timeout or TIMEOUT_SECONDS))
    atexit.register(shutdown)
    return dataclasses.replace(context(), owns_group=True)


LOST_CONTACT = ("connection closed by peer", "connection reset", "timed out", "timeout", "broken pipe", "gloo")


def lost_contact(exc: BaseException, dist: DistContext) -> CifarCnnError | None:
    """The one-line error for a collective that failed because another process died, hung or left (a killed node);
    None for any other exception."""
    if not dist.active or not isinstance(exc, RuntimeError):  # torch's DistError is a RuntimeError
        return None
    text = str(exc).strip()
    if not isinstance(exc, tdist.DistError) and not any(k in text.lower() for k in LOST_CONTACT):
        return None
    first = (text.splitlines() or [type(exc).__name__])[0]
    return CifarCnnError(
        f"rank {dist.rank} of {dist.world_size} lost contact with the other processes ({first[:160]}); a node "
        "died, hung past --dist-timeout or left"
    )


def shutdown() -> None:
    """Leave the process group (safe to call twice)."""
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of rank's contiguous share of n items; shares differ in size by at most one."""
    return rank * n // world_size, (rank + 1) * n // world_size


class ShardedLoader:
    """One rank's view of a TensorLoader: at every step, its slice of the global batch the loader yields.

    The global batch (order, augmentation) is built exactly as in one process and then sliced, so sharding changes
    nothing about which images are seen or how they are augmented.
    """

    def __init__(self, loader: TensorLoader, rank: int, world_size: int) -> None:
        self.loader, self.rank, self.world_size = loader, rank, world_size
        n, b = len(loader.labels), loader.batch_size
        last = n - (len(loader) - 1) * b if len(loader) else b
        if b < world_size or last < world_size:
            raise CifarCnnError(
                f"{world_size} processes need at least {world_size} images in every global batch, but batch_size is "
                f"{b} and the epoch's last batch has {last}: raise --batch-size or pass --drop-last"
            )

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    def global_batch_size(self, step: int) -> int:
        return self.loader.global_batch_size(step)

    def batches(self, epoch: int, start: int = 0) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        for step, x, y in self.loader.batches(epoch, start):
            lo, hi = shard_bounds(len(y), self.rank, self.world_size)
            yield step, x[lo:hi], y[lo:hi]

    def loss_weight(self, step: int, n_local: int, reduction: str = "mean") -> float:
        """Factor for this rank's loss so that DDP's average of gradients is the one-process gradient of the global
        batch: for a mean, the average over ranks of (n_r * W / N) * mean_r = sum over all images / N; for a sum, W."""
        if reduction == "sum":
            return float(self.world_size)
        return n_local * self.world_size / self.global_batch_size(step)
