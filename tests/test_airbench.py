"""The airbench-family net and the fast recipes: whitening checked against an independent covariance, alternating
flips, a short run of every recipe and an exact resume. (Muon: test_optim.py; the weight average: test_ema.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cifar_cnn import load_checkpoint, resolve_config, train
from cifar_cnn.data.pipeline import Augment, TensorLoader
from cifar_cnn.errors import CifarCnnError
from cifar_cnn.models import create_model
from cifar_cnn.recipes import RECIPES


def test_whitening_layer_whitens_patches() -> None:
    torch.manual_seed(0)
    # correlated "images": a smooth random field, so neighbouring pixels and channels correlate strongly
    x = torch.nn.functional.avg_pool2d(torch.randn(400, 3, 36, 36), 5, stride=1)[:, :, :32, :32]
    x = x + 0.5 * x.mean(1, keepdim=True)
    model = create_model("airbench", widths=[16, 16, 16])
    k = 2

    def patch_cov() -> torch.Tensor:
        out = torch.nn.functional.conv2d(x, model.whiten.weight[:12], model.whiten.bias[:12])  # the + half
        feats = out.permute(0, 2, 3, 1).reshape(-1, 12)
        return feats.T @ feats / len(feats)

    model.init_from_data(x, eps=1e-9)  # no regularization: exactly white
    assert torch.allclose(patch_cov(), torch.eye(12), atol=0.02)
    model.init_from_data(x)  # the default eps damps the weakest directions but keeps them uncorrelated
    cov = patch_cov()
    assert (cov - torch.diag(cov.diag())).abs().max() < 0.02 and (cov.diag() > 0.5).all() and (cov.diag() <= 1).all()
    assert model.whiten.weight.shape == (2 * 3 * k * k, 3, k, k)
    assert torch.equal(model.whiten.weight[12:], -model.whiten.weight[:12])


def test_whitening_on_patches_runs_the_net_at_half_the_side() -> None:
    """whiten_stride 2: the whitening filters see non-overlapping 2x2 patches (the same filters as stride 1, at every
    other position), so everything after it runs on 16 x 16 maps: about a quarter of the FLOPs."""
    from cifar_cnn.bench import count_flops

    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    dense, patches = (create_model("airbench", widths=[16, 32, 32], whiten_stride=s) for s in (1, 2))
    dense.init_from_data(x)
    patches.init_from_data(x)
    assert torch.equal(dense.whiten.weight, patches.whiten.weight)
    with torch.no_grad():
        assert torch.allclose(patches.whiten(x), dense.whiten(x)[:, :, ::2, ::2], atol=1e-5)
        assert patches(x).shape == (8, 10)
    ratio = count_flops(lambda: patches(x)) / count_flops(lambda: dense(x))
    assert 0.2 < ratio < 0.3
    with pytest.raises(CifarCnnError, match="whiten_stride must be 1 or whiten_kernel"):
        create_model("airbench", whiten_stride=3)


def test_alternating_flip_each_image_flipped_in_one_of_two_epochs() -> None:
    x = torch.arange(10 * 3 * 4 * 4, dtype=torch.float32).view(10, 3, 4, 4)
    loader = TensorLoader(x, torch.arange(10), 10, shuffle=False, augment=Augment(alternate_flip=True), seed=3)
    (_, e0, _), (_, e1, _) = next(loader.batches(0)), next(loader.batches(1))
    for a, b, orig in zip(e0, e1, x):
        flipped = [torch.equal(v, orig.flip(2)) for v in (a, b)]
        plain = [torch.equal(v, orig) for v in (a, b)]
        assert sorted(flipped) == [False, True] and sorted(plain) == [False, True]
    assert 0 < sum(torch.equal(a, o.flip(2)) for a, o in zip(e0, x)) < 10  # a random half-ish in epoch 0


@pytest.mark.parametrize(
    "recipe", [pytest.param(r, marks=pytest.mark.slow) if r == "accurate" else r for r in sorted(RECIPES)]
)  # accurate: 3 minutes on 2 cores, run by hand (--runslow)
def test_recipe_smoke(recipe: str, tmp_path: Path, official_dir: Path) -> None:
    """CI's short run of every recipe on the tiny data set: it trains, writes its files and records its TTA."""
    cfg = resolve_config(
        recipe, None, {"epochs": 1, "batch_size": 100, "device": "cpu", "precision": "fp32", "eval_batch_size": 200}
    )
    res = train(cfg, str(official_dir), tmp_path / "run", log=lambda m: None, threads=1)
    assert res["test_metrics"]["tta"] == RECIPES[recipe].values["tta"]
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["tta"] == RECIPES[recipe].values["tta"]
    if RECIPES[recipe].values["val_split"] == 0:
        assert "final weights" in best["note"]


def test_airbench_resume_bit_identical(tmp_path: Path, official_dir: Path) -> None:
    """Stopped inside epoch 2 and resumed == straight (the LR schedule spans both epochs, so the stopped run must
    keep its epoch count: resuming is not the same as training a 1-epoch run and extending it)."""
    over = {
        "epochs": 2,
        "batch_size": 100,
        "device": "cpu",
        "precision": "fp32",
        "eval_batch_size": 200,
        "model_args": {"widths": [16, 32, 32], "depth": 3},
        "cutout": 6,
    }
    cfg = resolve_config("fast", None, over)
    train(cfg, str(official_dir), tmp_path / "a", log=lambda m: None, threads=1)
    part = tmp_path / "b"
    polls = iter(range(10**6))
    res = train(cfg, str(official_dir), part, log=lambda m: None, threads=1, should_stop=lambda: next(polls) >= 8)
    assert res["interrupted"] and load_checkpoint(part / "last.pt")["batch_in_epoch"] > 0
    train(cfg, str(official_dir), part, resume=part / "last.pt", log=lambda m: None, threads=1)
    a, b = load_checkpoint(tmp_path / "a" / "last.pt"), load_checkpoint(part / "last.pt")
    for k in a["model_state"]:
        assert torch.equal(a["model_state"][k], b["model_state"][k]), k


@pytest.mark.parametrize("extra", [{}, {"val_split": 0.2}, {"ema_decay": 0.9, "val_split": 0.2}])
def test_patch_epochs_train_on_patches_first_then_at_full_resolution(
    extra: dict, tmp_path: Path, official_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Progressive resizing: with patch_epochs 2 of 3, every training forward of epochs 1-2 runs the whitening layer
    at stride 2 and those of epoch 3 at stride 1, while every evaluation (validation, probes, the test; with and
    without a weight average) sees the net as saved, at stride 1: a patch epoch is judged by what best.pt holds."""
    from cifar_cnn.evaluate import evaluate_checkpoint
    from cifar_cnn.models import airbench

    calls: list[tuple[bool, tuple[int, int]]] = []
    forward = airbench.AirNet.forward

    def recording(self: airbench.AirNet, x: torch.Tensor) -> torch.Tensor:
        calls.append((self.training, tuple(self.whiten.stride)))
        return forward(self, x)

    monkeypatch.setattr(airbench.AirNet, "forward", recording)
    values = {"epochs": 3, "patch_epochs": 2, "batch_size": 100, "device": "cpu", "eval_batch_size": 200}
    cfg = resolve_config("quick", None, {**values, "tta": "none", **extra})
    probed: list[tuple[int, int]] = []
    lines: list[str] = []
    res = train(
        cfg,
        str(official_dir),
        tmp_path / "run",
        log=lines.append,
        threads=1,
        probe=lambda model, step, spe: probed.append(tuple(model.whiten.stride)),
    )
    training = [stride for is_training, stride in calls if is_training]
    steps = len(training) // 3
    assert steps in (4, 6) and training == [(2, 2)] * (2 * steps) + [(1, 1)] * steps
    assert all(stride == (1, 1) for is_training, stride in calls if not is_training)
    assert probed == [(1, 1)] * (3 * steps)
    assert "epoch 1: 2x2 patches (1/4 of the pixels)" in lines and "epoch 3: full resolution from here" in lines
    again = evaluate_checkpoint(tmp_path / "run" / "best.pt", str(official_dir), device="cpu", log=lambda m: None)
    assert again["accuracy"] == res["test_metrics"]["accuracy"]


@pytest.mark.parametrize(
    "values",
    [
        {"model": "resnet18"},
        {"model_args": {"widths": [8, 8, 8], "whiten_stride": 2}},
        {"epochs": 2, "patch_epochs": 2},
    ],
)
def test_patch_epochs_refused_where_it_cannot_apply(values: dict) -> None:
    with pytest.raises(CifarCnnError, match="patch_epochs"):
        resolve_config("quick", None, {"patch_epochs": 1, "epochs": 3, **values})
