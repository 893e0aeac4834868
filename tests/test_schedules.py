"""LR schedules against torch's own schedulers as the reference."""

from __future__ import annotations

import pytest
import torch

from cifar_cnn.schedules import lr_multiplier


def torch_lrs(make, steps: int) -> list[float]:
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_matches_torch() -> None:
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=99, eta_min=0.1), 100)
    ours = [lr_multiplier(s, 100, "cosine", final_fraction=0.1) for s in range(100)]
    assert ours == pytest.approx(ref, abs=1e-9)


def test_step_matches_torch() -> None:
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5), 30)
    assert [lr_multiplier(s, 30, "step", step_size=7, gamma=0.5) for s in range(30)] == pytest.approx(ref)


def test_linear_matches_torch() -> None:
    ref = torch_lrs(lambda o: torch.optim.lr_scheduler.LinearLR(o, 1.0, 0.2, total_iters=49), 50)
    assert [lr_multiplier(s, 50, "linear", final_fraction=0.2) for s in range(50)] == pytest.approx(ref)


def test_onecycle_shape_and_warmup() -> None:
    values = [lr_multiplier(s, 100, "onecycle", warmup_steps=30) for s in range(100)]
    assert values[0] == 0.0 and values[30] == pytest.approx(1.0) and values[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a <= b for a, b in zip(values[:30], values[1:31]))  # rises
    assert all(a >= b for a, b in zip(values[30:], values[31:]))  # falls
    assert [lr_multiplier(s, 10, "constant", warmup_steps=4) for s in range(6)] == pytest.approx(
        [0.2, 0.4, 0.6, 0.8, 1, 1]
    )


def test_unknown_schedule() -> None:
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_multiplier(0, 10, "bogus")
