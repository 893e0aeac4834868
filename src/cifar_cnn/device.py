"""Device and numeric precision: what `--device auto` and `--precision auto` pick, and the autocast context."""

from __future__ import annotations

import collections
import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch

from .choices import DEVICES, PRECISIONS
from .errors import CifarCnnError


def resolve_device(name: str = "auto") -> torch.device:
    if name not in DEVICES and not name.startswith("cuda:"):
        raise CifarCnnError(f"--device must be one of {', '.join(DEVICES)}, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CifarCnnError("--device cuda: no CUDA GPU is available to this PyTorch build; use --device cpu")
    return torch.device(name)


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX); without it bf16 autocast is slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(name: str, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA with bf16 and on CPUs with native bf16, fp16 on older CUDA GPUs, else fp32."""
    if name not in PRECISIONS:
        raise CifarCnnError(f"--precision must be one of {', '.join(PRECISIONS)}, got {name!r}")
    if name != "auto":
        if name == "fp16" and device.type == "cpu":
            raise CifarCnnError("--precision fp16 is for CUDA; on a CPU use bf16 or fp32")
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_has_bf16() else "fp32"


def compute_dtype(precision: str) -> torch.dtype:
    """The tensor type a resolved precision computes in (and the training split is stored in)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed-precision context for forward passes ('fp32' -> no autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=compute_dtype(precision))


def set_threads(threads: int | None) -> int:
    """Set the CPU threads torch uses (None: leave torch's default); returns the number in effect."""
    if threads is not None:
        if threads < 1:
            raise CifarCnnError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


@functools.cache
def tune_allocator() -> bool:
    """Keep glibc from returning big blocks to the kernel after every use (Linux only).

    Convolution activations are megabytes each; by default glibc serves blocks that large with mmap and unmaps them
    on free, so every training step page-faults its whole working set anew and much of the CPU time goes to the
    kernel. Raising the mmap threshold to 1 GiB and never trimming the heap (the same as MALLOC_MMAP_THRESHOLD_ and
    MALLOC_TRIM_THRESHOLD_ in the environment) lets freed blocks be reused. Set CIFAR_CNN_NO_MALLOPT=1 to skip.
    """
    import ctypes
    import os
    import sys

    if not sys.platform.startswith("linux") or os.environ.get("CIFAR_CNN_NO_MALLOPT"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameter numbers from <malloc.h>
    # mallopt takes a C int: -1 means "never trim" (it becomes the largest unsigned value inside glibc)
    ok_mmap = libc.mallopt(m_mmap_threshold, ctypes.c_int(1 << 30))
    ok_trim = libc.mallopt(m_trim_threshold, ctypes.c_int(-1))
    return bool(ok_mmap and ok_trim)


# aten operators that make the host wait for the device: reading a value (.item(), bool(), int(), float()) and those
# whose output size depends on the data (boolean masks, nonzero, unique)
_HOST_SYNC_OPS = (
    "aten._local_scalar_dense",
    "aten.nonzero",
    "aten.masked_select",
    "aten.unique",
    "aten._unique",
    "aten._unique2",
    "aten.equal",
    "aten.is_nonzero",
    "aten.bincount",
    "aten.repeat_interleave",
    "aten.unique_consecutive",
    "aten.unique_dim",
)


@contextlib.contextmanager
def count_host_syncs() -> Iterator[collections.Counter]:
    """Count the operators run inside the block that would make the host wait for a GPU (see _HOST_SYNC_OPS; indexing
    with a boolean mask counts too), by operator name, on any device: on a CPU nothing waits, but the same code on a
    GPU would. A diagnostic for tests and benchmarks; it slows what runs inside it. Not seen on a CPU: copies from
    the device to the host (.cpu(), .numpy(), .tolist() of a CUDA tensor), which are no copies there; on a GPU,
    torch.cuda.set_sync_debug_mode("warn") reports those."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: collections.Counter = collections.Counter()

    class Counting(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            name = str(func.overloadpacket)
            boolean_index = name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ())
            )
            if name in _HOST_SYNC_OPS or boolean_index:
                counts[name] += 1
            return func(*args, **(kwargs or {}))

    with Counting():
        yield counts
