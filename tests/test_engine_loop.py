"""One epoch of steps (cifar_cnn.engine.loop): the fp16 loss scaler skips overflowing steps and is saved with the run,
so an fp16 run resumes exactly. fp16 autocast runs on this CPU, so the scaler's logic is tested here for real; a CUDA
GPU, where `--precision auto` can pick fp16, is checked when one is lent."""

from __future__ import annotations

import collections
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifar_cnn import load_checkpoint, resolve_config, train
from cifar_cnn.data.pipeline import TensorLoader, derived_generator
from cifar_cnn.device import count_host_syncs
from cifar_cnn.engine import state as engine_state
from cifar_cnn.engine.loop import (
    DivergenceError,
    apply_update,
    backward,
    loss_weights,
    make_scaler,
    set_lrs,
    train_one_epoch,
)


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


def _airbench_run(tmp_path: Path, official_dir: Path, batch_size: int, name: str) -> collections.Counter:
    """The syncs of a whole `train()` of the quick recipe's set-up (Muon, EMA, alternating flips, shifts), one epoch
    of 480 images in batches of `batch_size`, test included."""
    config = resolve_config(
        "quick",
        None,
        dict(
            epochs=1,
            batch_size=batch_size,
            model_args={"widths": [8, 16, 16], "depth": 1},
            ema_decay=0.9,
            device="cpu",
            eval_batch_size=250,
            tta="none",
        ),
    )
    with count_host_syncs() as counts:
        train(config, str(official_dir), tmp_path / name, log=lambda _: None, threads=1)
    return counts


def test_training_steps_never_wait_for_the_device(tmp_path: Path, official_dir: Path) -> None:
    """The same run in 4 and in 16 steps makes the same synchronizing calls: none per step (the epoch's totals at its
    end, the divergence check after the first update and at the end). Before the loop kept its totals on the device
    it made 3 per step (the loss check, loss.item(), the correct count)."""
    few = _airbench_run(tmp_path, official_dir, 120, "few")
    many = _airbench_run(tmp_path, official_dir, 30, "many")
    assert sum(few.values()) > 0  # the counter sees the run's reads of its results (it can fail)
    assert many == few


def test_one_epoch_makes_two_syncs_however_many_steps() -> None:
    model, opt = model_and_optimizer()
    g = torch.Generator().manual_seed(1)
    for steps in (2, 8):
        loader = TensorLoader(torch.randn(16 * steps, 4, generator=g), torch.randint(0, 3, (16 * steps,)), 16)
        with count_host_syncs() as counts:
            totals, _ = train_one_epoch(
                model, loader, opt, epoch=0, lr_fn=lambda s: 1.0, peak_lrs=[0.1], device=torch.device("cpu")
            )
        # the loss check after the first update (a run that diverges at once stops at once) and at the epoch's end
        assert counts == {"aten._local_scalar_dense": 2}, steps
        assert totals.seen == 16 * steps and 0 < totals.loss < 5 and 0 <= totals.correct <= 16 * steps


def test_totals_summed_on_the_device_equal_the_per_batch_sums() -> None:
    model, opt = model_and_optimizer()
    x, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    loader = TensorLoader(x, y, 16)
    expected = []
    for _, xb, yb in loader.batches(0):  # what the epoch's totals must add up to, step by step
        logits = model(xb)
        expected.append((F.cross_entropy(logits, yb).item() * 16, int((logits.argmax(1) == yb).sum())))
        opt.zero_grad()
        F.cross_entropy(logits, yb).backward()
        opt.step()
    model, opt = model_and_optimizer()
    totals, _ = train_one_epoch(model, loader, opt, epoch=0, lr_fn=lambda s: 1.0, peak_lrs=[0.1], device="cpu")
    assert totals.loss_sum == pytest.approx(sum(e[0] for e in expected), rel=1e-6)
    assert totals.correct == sum(e[1] for e in expected) and totals.seen == 64


@pytest.mark.parametrize("bad", ["inputs", "learning rate"])
def test_a_non_finite_loss_is_reported_with_its_step_and_cause(bad: str) -> None:
    """The divergence check is read at the epoch's end, yet it names the first step whose loss was not finite and,
    from that batch rebuilt, whether the inputs or the learning rate are to blame."""
    model, opt = model_and_optimizer()
    x, y = torch.randn(96, 4), torch.randint(0, 3, (96,))
    lr = 0.1 if bad == "inputs" else 1e38  # a runaway learning rate: the first update's weights overflow
    if bad == "inputs":
        x[16 * 3 + 5, 2] = float("nan")  # batch 4 of 6
    loader = TensorLoader(x, y, 16)
    with pytest.raises(DivergenceError) as err:
        train_one_epoch(model, loader, opt, epoch=1, lr_fn=lambda s: 1.0, peak_lrs=[lr], device="cpu")
    message = str(err.value)
    if bad == "inputs":
        assert "at epoch 2, step 4" in message and "NaN or infinite values after normalization" in message
    else:
        assert "at epoch 2, step 2;" in message and "lower the learning rate" in message
