"""Checkpoints: round trip, atomic writes, refusal of foreign files, and no code execution from a crafted pickle."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from cifar_cnn.checkpoint import describe, load_checkpoint, model_from_checkpoint, save_checkpoint, unwrap_state_dict
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
