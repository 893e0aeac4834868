"""The exponential moving average of the weights: checked against an independent average, and in a training run
(the average leaves training alone, best.pt holds it, last.pt keeps both, resume is exact)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cifar_cnn import load_checkpoint, resolve_config, train
from cifar_cnn.ema import WeightEMA, ema_decay_at
from cifar_cnn.errors import CifarCnnError
from cifar_cnn.models import create_model


def test_ema_matches_an_independent_average() -> None:
    torch.manual_seed(0)
    model = create_model("airbench", widths=[8, 16, 16])
    ema = WeightEMA(model, decay=0.9)
    ref = {k: v.clone().double() if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}
    for t in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model.groups[0].bn1.running_mean.add_(1.0)  # buffers are averaged too
            model.groups[0].bn1.num_batches_tracked += 1  # integers are copied
        ema.update(model)
        d = min(0.9, (1 + t) / (10 + t))
        assert ema_decay_at(t, 0.9) == pytest.approx(d)
        for k, v in model.state_dict().items():
            ref[k] = d * ref[k] + (1 - d) * v.double() if v.is_floating_point() else v.clone()
    for k, v in ema.module.state_dict().items():
        assert torch.allclose(v.double(), ref[k], atol=1e-5) if v.is_floating_point() else torch.equal(v, ref[k]), k
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError):
        WeightEMA(model, decay=1.0)


def test_training_with_ema_saves_the_average_of_the_trained_weights(tmp_path: Path, official_dir: Path) -> None:
    """The EMA does not change training (a run without it gives the same trained weights); after every step the
    average moves by the warm-up decay towards the trained weights; best.pt holds the final average."""
    over = {
        "epochs": 2,
        "subset": 200,
        "batch_size": 100,
        "device": "cpu",
        "precision": "fp32",
        "model_args": {"widths": [8, 16, 16], "depth": 2},
    }

    def run(name: str, ema_decay: float) -> list[dict[str, torch.Tensor]]:
        seen: list[dict[str, torch.Tensor]] = []
        cfg = resolve_config("quick", None, {**over, "ema_decay": ema_decay})
        train(
            cfg,
            str(official_dir),
            tmp_path / name,
            log=lambda m: None,
            threads=1,
            probe=lambda model, step, per_epoch: seen.append({k: v.clone() for k, v in model.state_dict().items()}),
        )
        return seen

    trained, averaged = run("plain", 0.0), run("ema", 0.5)
    assert len(trained) == len(averaged) == 4
    for t in range(1, 4):
        d = min(0.5, (2 + t) / (11 + t))  # update number t + 1
        for k, w in trained[t].items():
            want = d * averaged[t - 1][k] + (1 - d) * w if w.is_floating_point() else w
            assert torch.allclose(averaged[t][k], want, atol=1e-6), (t, k)
    best, last = load_checkpoint(tmp_path / "ema" / "best.pt"), load_checkpoint(tmp_path / "ema" / "last.pt")
    assert "moving average" in best["note"] and best["ema_state"] is None and last["ema_state"]["updates"] == 4
    for k, w in trained[-1].items():
        assert torch.equal(last["model_state"][k], w), k  # last.pt: the trained weights, as without EMA
        assert torch.equal(best["model_state"][k], averaged[-1][k]), k
    assert not torch.equal(best["model_state"]["head.weight"], trained[-1]["head.weight"])


def test_ema_run_resumes_bit_identical(tmp_path: Path, official_dir: Path) -> None:
    over = {
        "epochs": 2,
        "subset": 400,
        "batch_size": 100,
        "device": "cpu",
        "precision": "fp32",
        "ema_decay": 0.8,
        "model_args": {"widths": [8, 16, 16], "depth": 2},
    }
    cfg = resolve_config("quick", None, over)
    train(cfg, str(official_dir), tmp_path / "a", log=lambda m: None, threads=1)
    polls = iter(range(10**6))
    part = tmp_path / "b"
    train(cfg, str(official_dir), part, log=lambda m: None, threads=1, should_stop=lambda: next(polls) >= 5)
    stopped = load_checkpoint(part / "last.pt")
    assert stopped["ema_state"]["updates"] == 5 and stopped["batch_in_epoch"] == 1  # inside epoch 2
    train(cfg, str(official_dir), part, resume=part / "last.pt", log=lambda m: None, threads=1)
    a, b = load_checkpoint(tmp_path / "a" / "best.pt"), load_checkpoint(part / "best.pt")
    with pytest.raises(CifarCnnError, match="averaged .EMA. weights"):  # best.pt is not where training stood
        train(cfg, str(official_dir), tmp_path / "c", resume=tmp_path / "a" / "best.pt", log=lambda m: None)
    for k in a["model_state"]:
        assert torch.equal(a["model_state"][k], b["model_state"][k]), k
