"""Device, precision, autocast, threads and the allocator tuning in cifar_cnn.device."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
import torch

from cifar_cnn import device as dev
from cifar_cnn.device import autocast, resolve_device, resolve_precision, set_threads, tune_allocator
from cifar_cnn.errors import CifarCnnError

CPU = torch.device("cpu")


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def keep_threads() -> Iterator[int]:
    before = torch.get_num_threads()
    try:
        yield before
    finally:
        torch.set_num_threads(before)


def test_resolve_device_cpu() -> None:
    assert resolve_device("cpu") == CPU


def test_resolve_device_auto_without_cuda(no_cuda: None) -> None:
    assert resolve_device("auto") == CPU
    assert resolve_device() == CPU


def test_resolve_device_auto_with_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


@pytest.mark.parametrize("name", ["tpu", "CPU", "gpu", ""])
def test_resolve_device_bad_name(name: str) -> None:
    with pytest.raises(CifarCnnError, match=f"--device must be one of auto, cpu, cuda, got {name!r}"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_resolve_device_cuda_without_cuda(no_cuda: None, name: str) -> None:
    with pytest.raises(CifarCnnError, match="no CUDA GPU is available"):
        resolve_device(name)


@pytest.mark.parametrize("name", ["fp32", "bf16"])
def test_resolve_precision_explicit_on_cpu(name: str) -> None:
    assert resolve_precision(name, CPU) == name


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_resolve_precision_explicit_on_cuda(name: str) -> None:
    assert resolve_precision(name, torch.device("cuda")) == name


@pytest.mark.parametrize("name", ["fp8", "float32", "BF16", ""])
def test_resolve_precision_bad_name(name: str) -> None:
    with pytest.raises(CifarCnnError, match=f"--precision must be one of auto, fp32, bf16, fp16, got {name!r}"):
        resolve_precision(name, CPU)


def test_fp16_on_cpu_is_refused() -> None:
    with pytest.raises(CifarCnnError, match="--precision fp16 is for CUDA"):
        resolve_precision("fp16", CPU)


def test_auto_precision_on_cpu_follows_bf16_support() -> None:
    assert resolve_precision("auto", CPU) == ("bf16" if dev.cpu_has_bf16() else "fp32")


@pytest.mark.parametrize(("has_bf16", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cpu_both_ways(monkeypatch: pytest.MonkeyPatch, has_bf16: bool, expected: str) -> None:
    monkeypatch.setattr(dev, "cpu_has_bf16", lambda: has_bf16)
    assert resolve_precision("auto", CPU) == expected


@pytest.mark.parametrize(("has_bf16", "expected"), [(True, "bf16"), (False, "fp16")])
def test_auto_precision_on_cuda(monkeypatch: pytest.MonkeyPatch, has_bf16: bool, expected: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: has_bf16)
    assert resolve_precision("auto", torch.device("cuda")) == expected


def test_cpu_has_bf16_is_a_bool() -> None:
    assert isinstance(dev.cpu_has_bf16(), bool)


def _raise(exc: type[Exception]):
    def probe() -> bool:
        raise exc("no such op")

    return probe


@pytest.mark.parametrize(
    ("probe", "expected"),
    [(lambda: True, True), (lambda: 1, True), (lambda: False, False), (_raise(RuntimeError), False),
     (_raise(AttributeError), False)],
)  # fmt: skip
def test_cpu_has_bf16_follows_onednn_and_is_false_when_it_cannot_tell(
    monkeypatch: pytest.MonkeyPatch, probe, expected: bool
) -> None:
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", probe, raising=False)
    assert dev.cpu_has_bf16.__wrapped__() is expected  # past the cache: the probe runs again


def test_autocast_fp32_keeps_dtypes() -> None:
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with autocast(CPU, "fp32"):
        y = layer(x)
        assert not torch.is_autocast_enabled("cpu")
    assert y.dtype == torch.float32


def test_autocast_bf16_makes_linear_bf16() -> None:
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    with autocast(CPU, "bf16"):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert layer.weight.dtype == torch.float32  # the parameters themselves are untouched
    assert layer(x).dtype == torch.float32  # and autocast ends with the context


@pytest.mark.parametrize("threads", [0, -1])
def test_set_threads_below_one_refused(keep_threads: int, threads: int) -> None:
    with pytest.raises(CifarCnnError, match=f"--threads must be at least 1, got {threads}"):
        set_threads(threads)
    assert torch.get_num_threads() == keep_threads


def test_set_threads_one(keep_threads: int) -> None:
    assert set_threads(1) == 1
    assert torch.get_num_threads() == 1


def test_set_threads_none_leaves_default(keep_threads: int) -> None:
    assert set_threads(None) == keep_threads
    assert torch.get_num_threads() == keep_threads


def test_tune_allocator_returns_bool(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIFAR_CNN_NO_MALLOPT", raising=False)
    result = tune_allocator.__wrapped__()
    assert isinstance(result, bool)
    if sys.platform.startswith("linux") and sys.implementation.name == "cpython":
        import platform

        if platform.libc_ver()[0] == "glibc":
            assert result is True


def test_tune_allocator_env_opt_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIFAR_CNN_NO_MALLOPT", "1")
    assert tune_allocator.__wrapped__() is False


def test_tune_allocator_off_linux(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CIFAR_CNN_NO_MALLOPT", raising=False)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert tune_allocator.__wrapped__() is False
