"""The optimizers: Newton-Schulz orthogonalization against an SVD reference, Muon's fixed filter norm, and the
parameter groups of the muon optimizer set."""

from __future__ import annotations

import pytest
import torch

from cifar_cnn.models import create_model
from cifar_cnn.optim import Muon, OptimizerSet, build_optimizer, newton_schulz


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
