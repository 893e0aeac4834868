"""One epoch of steps (cifar_cnn.engine.loop): the fp16 loss scaler skips overflowing steps and is saved with the run,
so an fp16 run resumes exactly. fp16 autocast runs on this CPU, so the scaler's logic is tested here for real; a CUDA
GPU, where `--precision auto` can pick fp16, is checked when one is lent."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifar_cnn import load_checkpoint, resolve_config, train
from cifar_cnn.data.pipeline import TensorLoader, derived_generator
from cifar_cnn.engine import state as engine_state
from cifar_cnn.engine.loop import apply_update, backward, loss_weights, make_scaler, set_lrs, train_one_epoch


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)


def model_and_optimizer() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def test_only_fp16_gets_a_scaler() -> None:
    cpu = torch.device("cpu")
    assert make_scaler(cpu, "fp32") is None and make_scaler(cpu, "bf16") is None
    assert isinstance(make_scaler(cpu, "fp16"), torch.amp.GradScaler)


def backward_and_step(
    optimizer: torch.optim.Optimizer, loss: torch.Tensor, scaler: torch.amp.GradScaler | None
) -> bool:
    """One whole step on one batch, as train_one_epoch takes it (accum_steps 1)."""
    optimizer.zero_grad(set_to_none=True)
    backward(loss, scaler)
    return apply_update(optimizer, scaler)


def test_an_overflowing_step_is_skipped_and_the_scale_falls() -> None:
    model, opt = model_and_optimizer()
    before = copy.deepcopy(model.state_dict())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
    x, y = batch()
    loss = 1000 * F.cross_entropy(model(x), y)  # gradients of ~1e2 times 2**127 overflow float32
    assert backward_and_step(opt, loss, scaler) is False
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the step was skipped
    assert scaler.get_scale() == 2.0**126  # backoff factor 0.5


def test_a_scaled_step_equals_the_unscaled_step() -> None:
    """Scaling by a power of two and unscaling is exact: the update is the plain SGD update, bit for bit."""
    x, y = batch(1)
    plain, plain_opt = model_and_optimizer()
    assert backward_and_step(plain_opt, F.cross_entropy(plain(x), y), None) is True
    scaled, scaled_opt = model_and_optimizer()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    assert backward_and_step(scaled_opt, F.cross_entropy(scaled(x), y), scaler) is True
    for k, v in scaled.state_dict().items():
        assert torch.equal(v, plain.state_dict()[k]), k
    assert scaler.get_scale() == 1024.0


def test_set_lrs_follows_the_schedule_and_early_groups_decay_on_their_own() -> None:
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a], "lr": 1.0}, {"params": [b], "lr": 2.0, "decay_steps": 10}], lr=1.0)
    set_lrs(opt, [1.0, 2.0], global_step=4, scale=0.5)
    assert [g["lr"] for g in opt.param_groups] == [0.5, 2.0 * (1 - 4 / 10)]
    set_lrs(opt, [1.0, 2.0], global_step=12, scale=0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.0]


@pytest.fixture
def fp16_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the engine train in fp16 on this CPU (the command line refuses it: on a CPU bf16 is the half precision)."""
    monkeypatch.setattr(engine_state, "resolve_precision", lambda name, device: "fp16")


def test_fp16_run_saves_the_scaler_and_resumes_exactly(tmp_path: Path, official_dir: Path, fp16_on_cpu: None) -> None:
    config = resolve_config(
        "seed", None, dict(epochs=2, batch_size=32, lr=0.02, momentum=0.9, device="cpu", eval_batch_size=200)
    )
    straight = tmp_path / "straight"
    train(config, str(official_dir), straight, log=lambda _: None, threads=1)
    ckpt = load_checkpoint(straight / "last.pt")
    state = ckpt["scaler_state"]
    assert state is not None and state["scale"] > 0 and state["_growth_tracker"] == 2 * 15  # 15 steps per epoch

    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return calls["n"] == 20  # inside epoch 2

    part = tmp_path / "part"
    res = train(config, str(official_dir), part, log=lambda _: None, threads=1, should_stop=stop)
    assert res.interrupted and load_checkpoint(part / "last.pt")["batch_in_epoch"] > 0
    train(config, None, part, resume=part / "last.pt", log=lambda _: None, threads=1)
    resumed = load_checkpoint(part / "last.pt")
    assert resumed["scaler_state"] == ckpt["scaler_state"]
    for k, v in ckpt["model_state"].items():
        assert torch.equal(v, resumed["model_state"][k]), k


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_class_weighted_epoch_equals_hand_written_sgd(reduction: str) -> None:
    """train_one_epoch with class weights: each step is SGD on sum_i w[y_i] * CE_i (divided by the batch's image count
    for "mean"), and the epoch's reported loss sums that weighted loss."""
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(10, 4, generator=g), torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 2])
    weights = loss_weights("auto", y.numpy(), 3, "cpu")
    assert torch.allclose(weights, torch.tensor([10 / 18, 10 / 9, 10 / 3]))
    loader = TensorLoader(x, y, batch_size=4, shuffle=True, seed=1)
    model, opt = model_and_optimizer()
    totals, next_step = train_one_epoch(
        model, loader, opt, epoch=0, lr_fn=lambda step: 1.0, peak_lrs=[0.1], device=torch.device("cpu"),
        loss_reduction=reduction, class_weights=weights,
    )  # fmt: skip
    assert next_step == 3 and totals.seen == 10

    ref, _ = model_and_optimizer()
    w, b = ref.weight.detach().clone(), ref.bias.detach().clone()
    loss_sum = 0.0
    order = torch.randperm(10, generator=derived_generator(1, 0, -1))  # the loader's epoch-0 order
    for idx in order.split(4):
        w.requires_grad_(True), b.requires_grad_(True)
        logp = (x[idx] @ w.T + b).log_softmax(1)
        weighted = -(weights[y[idx]] * logp[torch.arange(len(idx)), y[idx]]).sum()
        loss = weighted / len(idx) if reduction == "mean" else weighted
        gw, gb = torch.autograd.grad(loss, (w, b))
        w, b = (w - 0.1 * gw).detach(), (b - 0.1 * gb).detach()
        loss_sum += weighted.item()
    assert torch.allclose(model.weight, w, atol=1e-6) and torch.allclose(model.bias, b, atol=1e-6)
    assert totals.loss_sum == pytest.approx(loss_sum, rel=1e-5)
