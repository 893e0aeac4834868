"""The airbench-family net, the Muon optimizer set and the fast recipes: checked against independent references."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cifar_cnn import load_checkpoint, resolve_config, train
from cifar_cnn.data.pipeline import Augment, TensorLoader
from cifar_cnn.errors import CifarCnnError
from cifar_cnn.models import create_model
from cifar_cnn.optim import Muon, OptimizerSet, build_optimizer, newton_schulz
from cifar_cnn.recipes import RECIPES


def test_newton_schulz_orthogonalizes() -> None:
    torch.manual_seed(0)
    for shape in [(64, 27), (16, 200), (50, 50)]:
        g = torch.randn(shape)
        s_in = torch.linalg.svdvals(g / g.norm())
        s = torch.linalg.svdvals(newton_schulz(g))
        # the quintic iteration trades exactness for speed: every singular value not tiny to begin with lands near
        # 1 (reference: SVD); the few tiny ones of a square random matrix stay small after 3 steps
        big = s_in > 0.02
        assert s[big].min() > 0.5 and s.max() < 1.3, (shape, s[big].min(), s.max())
        assert big.float().mean() >= 0.85
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        cos = torch.nn.functional.cosine_similarity(newton_schulz(g).flatten(), (u @ vh).flatten(), dim=0)
        assert cos > 0.9


def test_muon_keeps_filter_norm_and_descends() -> None:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 3, 3, 3))
    target = torch.randn(8, 3, 3, 3)
    opt = Muon([w], lr=0.05, momentum=0.6)
    losses = []
    for _ in range(30):
        loss = ((w - target) ** 2).sum()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.allclose(w.norm(), torch.tensor(8**0.5) * 1.0, rtol=0.2)  # rescaled each step, then one update
    assert min(losses[-5:]) < losses[0]


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


def test_param_groups() -> None:
    model = create_model("airbench", widths=[8, 16, 16])
    opt = build_optimizer(model, "muon", lr=0.1, momentum=0.8, weight_decay=0.5, head_lr_factor=10, early_steps=7)
    assert isinstance(opt, OptimizerSet)
    sgd, muon = opt.optimizers
    filters = {id(p) for n, p in model.named_parameters() if p.ndim == 4 and p.requires_grad}
    assert {id(p) for p in muon.param_groups[0]["params"]} == filters
    by_lr = {round(g["lr"], 6): g for g in sgd.param_groups}
    assert set(by_lr) == {0.1, 1.0}
    head = by_lr[1.0]
    assert [id(p) for p in head["params"]] == [id(model.head.weight)] and head["weight_decay"] == pytest.approx(0.05)
    early = next(g for g in sgd.param_groups if "decay_steps" in g)
    assert early["decay_steps"] == 7 and early["params"][0] is model.whiten.bias
    assert not model.whiten.weight.requires_grad  # frozen: in no group
    all_in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all_in_groups == {id(p) for p in model.parameters() if p.requires_grad}


def test_alternating_flip_each_image_flipped_in_one_of_two_epochs() -> None:
    x = torch.arange(10 * 3 * 4 * 4, dtype=torch.float32).view(10, 3, 4, 4)
    loader = TensorLoader(x, torch.arange(10), 10, shuffle=False, augment=Augment(alternate_flip=True), seed=3)
    (_, e0, _), (_, e1, _) = next(loader.batches(0)), next(loader.batches(1))
    for a, b, orig in zip(e0, e1, x):
        flipped = [torch.equal(v, orig.flip(2)) for v in (a, b)]
        plain = [torch.equal(v, orig) for v in (a, b)]
        assert sorted(flipped) == [False, True] and sorted(plain) == [False, True]
    assert 0 < sum(torch.equal(a, o.flip(2)) for a, o in zip(e0, x)) < 10  # a random half-ish in epoch 0


@pytest.mark.parametrize("recipe", sorted(RECIPES))
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


def test_ema_matches_an_independent_average() -> None:
    from cifar_cnn.ema import WeightEMA, ema_decay_at

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
        train(cfg, str(official_dir), tmp_path / name, log=lambda m: None, threads=1,
              probe=lambda model, step, per_epoch: seen.append({k: v.clone() for k, v in model.state_dict().items()}))
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
