"""Checkpoints: round trip, atomic writes, refusal of foreign files, and no code execution from a crafted pickle."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from cifar_cnn.checkpoint import (
    FORMAT,
    SCHEMA,
    describe,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    unwrap_state_dict,
)
from cifar_cnn.errors import CifarCnnError
from cifar_cnn.models import create_model


def minimal(model: torch.nn.Module) -> dict:
    return {
        "model": {"name": "seed_cnn", "args": {"dropout": 0.1}},
        "classes": [str(i) for i in range(10)],
        "input_size": 32,
        "mean": [0.5] * 3,
        "std": [0.5] * 3,
        "model_state": unwrap_state_dict(model),
        "config": {"lr": 0.1, "mean": [0.5, 0.5, 0.5]},
        "rng_state": {"torch": torch.get_rng_state()},
        "epoch": 3,
    }


def test_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("seed_cnn", dropout=0.1)
    save_checkpoint(tmp_path / "c.pt", minimal(model))
    ckpt = load_checkpoint(tmp_path / "c.pt")
    rebuilt = model_from_checkpoint(ckpt)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(rebuilt(x), model.eval()(x))
    assert rebuilt.dropout.p == 0.1
    assert describe(ckpt)["parameters"] == sum(p.numel() for p in model.parameters())
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary file left behind


def test_state_dict_is_unwrapped() -> None:
    model = torch.nn.parallel.DistributedDataParallel.__new__(torch.nn.parallel.DistributedDataParallel)
    torch.nn.Module.__init__(model)
    model.module = create_model("seed_cnn")
    assert all(not k.startswith("module.") for k in unwrap_state_dict(model))


def test_failed_write_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = create_model("seed_cnn")
    path = tmp_path / "c.pt"
    save_checkpoint(path, minimal(model))
    before = path.read_bytes()

    real_fsync = os.fsync

    def full_disk(fd: int) -> None:  # the data reached the temporary file, then the disk filled up
        real_fsync(fd)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(CifarCnnError, match="previous file is intact"):
        save_checkpoint(path, minimal(model))
    assert path.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["c.pt"]


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/cifar_cnn_pwned_marker",))


def test_malicious_pickle_does_not_run(tmp_path: Path) -> None:
    marker = Path("/tmp/cifar_cnn_pwned_marker")
    marker.unlink(missing_ok=True)
    bad = tmp_path / "evil.pt"
    torch.save({"format": "cifar-cnn-checkpoint", "payload": Exploit()}, bad)  # a real torch zip with a code gadget
    legacy = tmp_path / "evil_legacy.pt"
    legacy.write_bytes(pickle.dumps(Exploit()))
    for f in (bad, legacy):
        with pytest.raises(CifarCnnError, match="not a cifar-cnn checkpoint"):
            load_checkpoint(f)
    assert not marker.exists()
    # proof that the file really is armed: an unsafe load would have run it
    pickle.loads(legacy.read_bytes())
    assert marker.exists()
    marker.unlink()


@pytest.mark.parametrize("content", [b"", b"hello", b"PK\x03\x04garbage"])
def test_not_a_checkpoint(tmp_path: Path, content: bytes) -> None:
    f = tmp_path / "x.pt"
    f.write_bytes(content)
    with pytest.raises(CifarCnnError, match="not a cifar-cnn checkpoint"):
        load_checkpoint(f)


def test_foreign_torch_file_and_truncated(tmp_path: Path) -> None:
    f = tmp_path / "sd.pt"
    torch.save(create_model("seed_cnn").state_dict(), f)
    with pytest.raises(CifarCnnError, match="no 'cifar-cnn-checkpoint' format tag"):
        load_checkpoint(f)
    good = tmp_path / "good.pt"
    save_checkpoint(good, minimal(create_model("seed_cnn")))
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CifarCnnError, match="not a cifar-cnn checkpoint, or a damaged one"):
        load_checkpoint(cut)
    assert zipfile.is_zipfile(good)


def test_weights_of_another_model(tmp_path: Path) -> None:
    ckpt = minimal(create_model("seed_cnn"))
    ckpt["classes"] = ["a", "b"]  # 2 classes, weights for 10
    save_checkpoint(tmp_path / "c.pt", ckpt)
    with pytest.raises(CifarCnnError, match="do not fit model"):
        model_from_checkpoint(load_checkpoint(tmp_path / "c.pt"))


# Hostile values for every field of a checkpoint's schema: wrong types, out-of-range numbers, NaN, huge sizes.
HOSTILE_VALUES = [
    None,
    "x" * 100_000,
    -1,
    10**30,
    float("nan"),
    float("inf"),
    True,
    [1, 2],
    ["a", "a"],
    {"a": 1},
    {1: "x"},
    torch.zeros(3),
    [float("nan"), 0.5, 0.5],
    [0.5, 0.0, 0.5],
    ["c"] * 100_001,
]


def full(model: torch.nn.Module) -> dict:
    """`minimal` with every optional field a real run writes, each valid."""
    return {
        **minimal(model),
        "num_classes": 10,
        "tta": "flip",
        "temperature": 1.5,
        "calibration": {"split": "val", "num_images": 40, "tta": "flip", "temperature_by_tta": {"none": 1.2}},
        "data_source": {"path": "/data", "options": {}, "fingerprint": {"classes": ["a"]}},
        "step": 40,
        "batch_in_epoch": 0,
        "threads": 1,
        "metrics": {"val_loss": 1.0},
        "history": [{"epoch": 1, "val_loss": 1.0}],
        "best_val_loss": float("inf"),  # no validation split
        "optimizer_state": {"state": {}, "param_groups": []},
        "scheduler_state": {"schedule": "constant", "step": 40},
        "scaler_state": None,
        "ema_state": {"decay": 0.99, "warmup": True, "updates": 3, "weights": {}},
        "epoch_totals": {"loss_sum": 1.0, "correct": 3, "seen": 4},
        "created": "2026-01-01T00:00:00+00:00",
        "note": "end of epoch",
        "package_version": "0.1.0",
        "torch_version": "2.13.0",
    }


def test_every_field_a_run_writes_loads(tmp_path: Path) -> None:
    ckpt = full(create_model("seed_cnn"))
    assert set(ckpt) - {"model_state"} <= set(SCHEMA) | {"temperature"}, "a field without a schema entry"
    save_checkpoint(tmp_path / "c.pt", ckpt)
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert describe(loaded)["tta"] == "flip" and model_from_checkpoint(loaded) is not None


@pytest.mark.parametrize("field", [*SCHEMA, "temperature"])
def test_every_field_is_checked_against_its_schema(field: str, tmp_path: Path) -> None:
    """Each hostile value of each field: the checkpoint loads (the value happens to be valid there) and then
    rebuilds and describes itself, or it is refused in one short line that names the file and the field."""
    base = full(create_model("seed_cnn"))
    refused = 0
    for i, value in enumerate(HOSTILE_VALUES):
        path = tmp_path / f"{field}_{i}.pt"
        torch.save({"format": FORMAT, "format_version": 1, **base, field: value}, path)  # no fsync: fast
        try:
            ckpt = load_checkpoint(path)
        except CifarCnnError as exc:
            message = str(exc)
            assert "\n" not in message and len(message) < 300 + len(str(path)), message[:400]
            assert message.startswith(f"{path}: ") and (field in message or "checkpoint lacks" in message), message
            refused += 1
            continue
        try:
            describe(ckpt)
            model_from_checkpoint(ckpt, path)
        except CifarCnnError:
            pass  # e.g. classes that do not fit the head: one line too (model_from_checkpoint's own check)
    assert refused >= len(HOSTILE_VALUES) // 2, (field, refused)


def test_input_size_is_bounded_before_anything_is_allocated(tmp_path: Path) -> None:
    """The issue's example: input_size 100000 made predict allocate 20 GB."""
    save_checkpoint(tmp_path / "c.pt", {**minimal(create_model("seed_cnn")), "input_size": 100_000})
    with pytest.raises(CifarCnnError, match=r"its input_size must be a whole number in 8\.\.1024, got 100000"):
        load_checkpoint(tmp_path / "c.pt")
    for size in (8, 224, 1024):  # what models use: CIFAR 32, ImageNet backbones 224..518
        save_checkpoint(tmp_path / "ok.pt", {**minimal(create_model("seed_cnn")), "input_size": size})
        assert load_checkpoint(tmp_path / "ok.pt")["input_size"] == size
