"""Training controls of the engine: gradient accumulation (against the larger batch, under DDP without needless
all-reduces, interrupted inside a group), gradient clipping (against a step computed by hand), early stopping on a
scripted validation curve, and the fine-tuning schedule freeze_epochs (the body untouched while frozen, its LR by
hand, exact resume across the boundary)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cifar_cnn import load_checkpoint, resolve_config, train
from cifar_cnn.config import TrainConfig
from cifar_cnn.data.pipeline import TensorLoader
from cifar_cnn.engine import resume_config
from cifar_cnn.engine import run as engine_run
from cifar_cnn.engine.loop import make_lr_fn, optimizer_for, set_lrs, train_one_epoch
from cifar_cnn.engine.run import epochs_since_best
from cifar_cnn.errors import CifarCnnError
from cifar_cnn.models import create_model

from .conftest import make_images, write_official_batches
from .helpers import quiet, small_config

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One CPU thread, as train(threads=1) below: small batches run many times faster on this kind of machine than
    with several threads contending, and float sums keep one order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def small_dir(tmp_path: Path) -> Path:
    """110 training images (90 to train on and 20 for validation at val_split 0.2) and 30 test images: runs of a few
    seconds on a slow CPU."""
    x, y = make_images(11, seed=1)
    tx, ty = make_images(3, seed=2)
    return write_official_batches(tmp_path / "cifar-10-batches-py", x, y, tx, ty)


@pytest.fixture
def fetched(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(epoch, step) of every training batch a TensorLoader hands out, in order: a stop request can then arrive while
    a given batch trains, as SIGTERM's flag would (the engine polls it only after optimizer updates)."""
    seen: list[tuple[int, int]] = []
    original = TensorLoader.batches

    def batches(self: TensorLoader, epoch: int, start: int = 0) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        for step, x, y in original(self, epoch, start):
            seen.append((epoch, step))
            yield step, x, y

    monkeypatch.setattr(TensorLoader, "batches", batches)
    return seen


def stop_once_fetched(seen: list[tuple[int, int]], epoch: int, step: int) -> Callable[[], bool]:
    """A should_stop that turns true once batch `step` of `epoch` has been handed out (and stays true)."""
    return lambda: (epoch, step) in seen


def fit_epochs(model: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig) -> None:
    """config.epochs epochs of train_one_epoch on (x, y), with the optimizer and LR schedule the config asks for."""
    loader = TensorLoader(x, y, config.batch_size, shuffle=True, seed=config.seed)
    optimizer = optimizer_for(model, config, len(loader))
    lr_fn = make_lr_fn(config, len(loader))
    peaks = [g["lr"] for g in optimizer.param_groups]
    for epoch in range(config.epochs):
        train_one_epoch(
            model, loader, optimizer, epoch=epoch, lr_fn=lr_fn, peak_lrs=peaks, device=CPU,
            accum_steps=config.accum_steps,
        )  # fmt: skip


def random_batch(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


# ---- gradient accumulation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "batch_size", "accum_steps"), [(107, 8, 4), (96, 8, 3)])
def test_accumulated_batches_train_like_the_larger_batch(n: int, batch_size: int, accum_steps: int) -> None:
    """K batches of B images accumulated = one batch of K x B images: same images (the epoch's order does not depend
    on the batch size), same gradient, same LR at every update (the schedule counts updates), over 2 epochs of SGD
    with Nesterov momentum, weight decay and a one-cycle schedule.

    107 images in batches of 8 make 14 per epoch, the last of 3 images: groups of 4, 4, 4 and 2 batches, the last
    group's losses weighted 8/11 and 3/11 as in the large run's last batch of 11 images. 96 in batches of 8 x 3:
    4 whole groups.

    In float64 (the weights and images; the loss itself is float32 in the engine): the runs agree to ~1e-16 (atol
    1e-9 asked). In float32 the two orders of summation differ by ~1e-8, and a ReLU or max-pool decision lying that
    close to its kink flips and changes a gradient by far more: after 8 updates the float32 runs differ by up to 6e-4.

    This holds for seed_cnn with dropout 0 because nothing in it looks across the images of a batch. Batch norm does:
    it normalizes each batch of B with that batch's mean and variance (not with the K x B images'), and its running
    statistics are updated once per forward, K times per update (see the next test).
    """
    x, y = random_batch(n)
    common = dict(
        epochs=2, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4, schedule="onecycle",
        final_lr_fraction=0.1, model_args={"dropout": 0.0}, device="cpu", precision="fp32",
    )  # fmt: skip
    models = {}
    for batch, accum in ((batch_size, accum_steps), (batch_size * accum_steps, 1)):
        torch.manual_seed(0)
        models[accum] = create_model("seed_cnn", num_classes=10, dropout=0.0).double()
        config = resolve_config("seed", None, {**common, "batch_size": batch, "accum_steps": accum})
        fit_epochs(models[accum], x.double(), y, config)
    torch.manual_seed(0)
    initial = create_model("seed_cnn", num_classes=10, dropout=0.0).double().state_dict()
    accumulated, large = models[accum_steps].state_dict(), models[1].state_dict()
    for key, value in large.items():
        assert (value - initial[key]).abs().max() > 1e-3, key  # trained: the comparison below is not of the initial
        torch.testing.assert_close(accumulated[key], value, rtol=0, atol=1e-9, msg=key)


def test_batch_norm_makes_accumulation_differ_from_the_larger_batch() -> None:
    """resnet18 (batch norm): 8 x 4 accumulated is not batch 32. Each forward normalizes with its 8 images' statistics,
    so the gradients differ, and the running statistics are updated 4 times per update instead of once."""
    x, y = random_batch(32, size=16)
    models = {}
    for batch, accum in ((8, 4), (32, 1)):
        torch.manual_seed(0)
        models[accum] = create_model("resnet18", num_classes=10, width=4)
        config = resolve_config(
            "seed", None,
            dict(model="resnet18", model_args={"width": 4}, epochs=1, batch_size=batch, accum_steps=accum, lr=0.1,
                 device="cpu", precision="fp32"),
        )  # fmt: skip
        fit_epochs(models[accum], x, y, config)
    accumulated, large = models[4].state_dict(), models[1].state_dict()
    assert accumulated["stem.1.num_batches_tracked"] == 4 and large["stem.1.num_batches_tracked"] == 1
    assert not torch.allclose(accumulated["stem.1.running_mean"], large["stem.1.running_mean"], atol=1e-5)
    assert not torch.allclose(accumulated["stem.0.weight"], large["stem.0.weight"], atol=1e-5)


def test_a_stop_inside_an_accumulation_group_finishes_the_group_and_resumes_exactly(
    tmp_path: Path, small_dir: Path, fetched: list[tuple[int, int]]
) -> None:
    """90 images in batches of 8: 12 per epoch, the last of 2 images; 5 per update: groups 0-4, 5-9, 10-11. A stop
    request arriving while batch 6 of epoch 2 trains is acted on after the group's update (batch 9): last.pt continues
    at batch 10, and the resumed run ends bit-identical to the straight one (dropout, flips, shifts and cutout on)."""
    config = small_config(batch_size=8, accum_steps=5, schedule="cosine", warmup_epochs=0.5)
    straight, part = tmp_path / "straight", tmp_path / "part"
    train(config, str(small_dir), straight, log=quiet, threads=1, evaluate_test=False)
    assert fetched[-1] == (1, 11)  # 12 batches per epoch
    fetched.clear()

    result = train(
        config, str(small_dir), part, log=quiet, threads=1, evaluate_test=False,
        should_stop=stop_once_fetched(fetched, 1, 6),
    )  # fmt: skip
    assert result.interrupted
    assert fetched[-1] == (1, 9)  # the group was finished, and nothing after it was trained
    ckpt = load_checkpoint(part / "last.pt")
    assert (ckpt["epoch"], ckpt["batch_in_epoch"]) == (1, 10)
    assert ckpt["epoch_totals"]["seen"] == 80

    fetched.clear()
    train(config, None, part, resume=part / "last.pt", log=quiet, threads=1, evaluate_test=False)
    assert fetched == [(1, 10), (1, 11)]
    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(part / "last.pt")
    for key, value in a["model_state"].items():
        assert torch.equal(value, b["model_state"][key]), key
    assert a["history"][1]["train_loss"] == pytest.approx(b["history"][1]["train_loss"], rel=1e-12)


def test_ddp_all_reduces_only_on_the_last_batch_of_a_group(tmp_path: Path) -> None:
    """A DDP model (one gloo process) accumulating 3 batches per update: the comm hook (one call per gradient bucket
    per all-reduce) runs only on each group's last batch, so 4 updates cost 4 x buckets all-reduces, where 11 batches
    without accumulation cost 11 x buckets. The weights equal those of the bare model trained alike."""
    tdist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        x, y = random_batch(42)  # batches of 4: 11 per epoch, the last of 2; groups 0-2, 3-5, 6-8, 9-10
        torch.manual_seed(0)
        model = create_model("seed_cnn", num_classes=10, dropout=0.0)
        bare = create_model("seed_cnn", num_classes=10, dropout=0.0)
        bare.load_state_dict(model.state_dict())
        ddp = DistributedDataParallel(model)
        calls: list[int] = []

        def count_then_all_reduce(state, bucket):  # no annotations: DDP checks them, and these would be strings
            calls.append(bucket.index())
            buffer = bucket.buffer().div_(tdist.get_world_size())
            return tdist.all_reduce(buffer, async_op=True).get_future().then(lambda fut: fut.value()[0])

        ddp.register_comm_hook(None, count_then_all_reduce)
        for _ in range(2):  # DDP regroups its buckets after the first backward: count them on the second
            before = len(calls)
            F.cross_entropy(ddp(x[:4]), y[:4]).backward()
            ddp.zero_grad(set_to_none=True)
        buckets = len(calls) - before
        assert buckets >= 1

        def epoch(net: nn.Module, index: int, accum_steps: int) -> list[int]:
            """Hook calls made while each batch of the epoch trained."""
            loader = TensorLoader(x, y, 4, shuffle=True, seed=1)
            per_batch: list[int] = []
            original = loader.batches

            def batches(epoch: int, start: int = 0) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
                for step, xb, yb in original(epoch, start):
                    before = len(calls)
                    yield step, xb, yb
                    per_batch.append(len(calls) - before)  # resumed: that batch's backward and update are done

            loader.batches = batches
            opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
            train_one_epoch(
                net, loader, opt, epoch=index, lr_fn=lambda u: 1.0, peak_lrs=[0.05], device=CPU,
                accum_steps=accum_steps,
            )  # fmt: skip
            return per_batch

        per_batch = epoch(ddp, 0, 3)
        assert per_batch == [0, 0, buckets, 0, 0, buckets, 0, 0, buckets, 0, buckets]
        assert sum(per_batch) == 4 * buckets  # updates x buckets
        assert epoch(bare, 0, 3) == [0] * 11  # the bare model has no hook
        for key, value in bare.state_dict().items():
            torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)
        assert epoch(ddp, 1, 1) == [buckets] * 11  # without accumulation: batches x buckets
    finally:
        tdist.destroy_process_group()


# ---- gradient clipping -------------------------------------------------------------------------------------------


def clip_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return 3 * torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)


def one_update(clip_grad: float, batch_size: int = 16, accum_steps: int = 1, scaler: object = None) -> nn.Linear:
    """nn.Linear(4, 3) after one SGD update (lr 0.5) on clip_batch's 16 images, through train_one_epoch."""
    x, y = clip_batch()
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    train_one_epoch(
        model, TensorLoader(x, y, batch_size), opt, epoch=0, lr_fn=lambda u: 1.0, peak_lrs=[0.5], device=CPU,
        clip_grad=clip_grad, accum_steps=accum_steps, scaler=scaler,
    )  # fmt: skip
    return model


def hand_step(clip_grad: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The same update by hand: gradients of the mean cross-entropy, their global L2 norm, the factor
    min(1, clip / (norm + 1e-6)) (torch's clip_grad_norm_ adds 1e-6), a plain SGD step. Returns (w, b, norm)."""
    x, y = clip_batch()
    torch.manual_seed(0)
    init = nn.Linear(4, 3)
    w, b = init.weight.detach().clone().requires_grad_(), init.bias.detach().clone().requires_grad_()
    logp = (x @ w.T + b).log_softmax(1)
    gw, gb = torch.autograd.grad(-logp[torch.arange(16), y].mean(), (w, b))
    norm = float((gw.pow(2).sum() + gb.pow(2).sum()).sqrt())
    factor = min(1.0, clip_grad / (norm + 1e-6)) if clip_grad > 0 else 1.0
    return (w - 0.5 * factor * gw).detach(), (b - 0.5 * factor * gb).detach(), norm


@pytest.mark.parametrize(("batch_size", "accum_steps"), [(16, 1), (8, 2)])
def test_clip_grad_scales_the_update_to_the_clip_norm(batch_size: int, accum_steps: int) -> None:
    """With clip 0.1 the step is the hand-clipped one, and its size is lr x 0.1; accumulated gradients (8 x 2) are
    clipped once, as the sum of the group."""
    w, b, norm = hand_step(0.1)
    assert norm > 1.0  # far above the clip: the clip acts
    model = one_update(0.1, batch_size, accum_steps)
    torch.testing.assert_close(model.weight.detach(), w, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.bias.detach(), b, rtol=0, atol=1e-6)
    torch.manual_seed(0)
    init = nn.Linear(4, 3)
    moved = torch.cat([(model.weight - init.weight).flatten(), model.bias - init.bias]).detach().norm()
    assert float(moved) == pytest.approx(0.5 * 0.1, rel=1e-5)


def test_clip_grad_above_the_norm_changes_nothing() -> None:
    w, b, norm = hand_step(0.0)
    clipped, plain = one_update(2 * norm), one_update(0.0)
    assert torch.equal(clipped.weight, plain.weight) and torch.equal(clipped.bias, plain.bias)
    torch.testing.assert_close(plain.weight.detach(), w, rtol=0, atol=1e-6)
    torch.testing.assert_close(plain.bias.detach(), b, rtol=0, atol=1e-6)


def test_clip_grad_with_the_fp16_scaler_clips_the_unscaled_gradients() -> None:
    """Under loss scaling the gradients are 1024 times too large until unscaled: clipped before unscaling, the step
    would come out 1024 times too small."""
    w, b, _ = hand_step(0.1)
    model = one_update(0.1, scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    torch.testing.assert_close(model.weight.detach(), w, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.bias.detach(), b, rtol=0, atol=1e-6)


# ---- early stopping (patience) -----------------------------------------------------------------------------------


def rows(*losses: float | None) -> list[dict[str, float | None]]:
    return [{"epoch": i + 1, "val_loss": v} for i, v in enumerate(losses)]


def test_epochs_since_best_by_hand() -> None:
    assert epochs_since_best([]) == 0
    assert epochs_since_best(rows(1.0)) == 0
    assert epochs_since_best(rows(1.0, 0.8)) == 0
    assert epochs_since_best(rows(1.0, 0.8, 0.9, 0.85)) == 2
    assert epochs_since_best(rows(1.0, 0.8, 0.8)) == 1  # a tie keeps the earlier epoch, as best.pt does
    assert epochs_since_best(rows(0.5, 0.8, 0.5, 0.9)) == 3
    assert epochs_since_best(rows(None, None, None)) == 0  # no validation split: never counts up
    assert epochs_since_best(rows(0.7, None, 0.8)) == 1  # epochs without a validation loss are left out


CURVE = [1.0, 0.8, 0.9, 0.85, 0.95, 0.7, 0.6, 0.65]  # the validation loss after epochs 1..8: best at 2, then at 6


@pytest.fixture
def scripted_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation returns CURVE instead of measuring (patience acts on the numbers alone)."""
    monkeypatch.setattr(engine_run, "validate_epoch", lambda state, epoch, paths: (CURVE[epoch], 0.5))


@pytest.mark.parametrize(("patience", "stopped_after"), [(2, 4), (3, 5)])
def test_patience_stops_the_run_when_validation_stalls(
    tmp_path: Path, small_dir: Path, scripted_validation: None, patience: int, stopped_after: int
) -> None:
    """Best at epoch 2; with patience 2 epochs 3 and 4 do not improve and the run ends after epoch 4 (patience 3:
    after 5), normally: best.pt (epoch 2) is tested."""
    out = tmp_path / "run"
    result = train(small_config(epochs=8, patience=patience), str(small_dir), out, log=quiet, threads=1)
    assert not result.interrupted
    assert [row["epoch"] for row in result.history] == list(range(1, stopped_after + 1))
    assert [row["val_loss"] for row in result.history] == CURVE[:stopped_after]
    assert result.extra["stopped_early_after_epoch"] == stopped_after
    assert result["stopped_early_after_epoch"] == stopped_after
    assert load_checkpoint(out / "best.pt")["epoch"] == 2
    assert load_checkpoint(out / "last.pt")["epoch"] == stopped_after
    assert result.test is not None and (out / "test_metrics.json").is_file()
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_patience_counts_on_across_a_resume(tmp_path: Path, small_dir: Path, scripted_validation: None) -> None:
    out = tmp_path / "run"
    first = train(small_config(epochs=3, patience=2), str(small_dir), out, log=quiet, threads=1, evaluate_test=False)
    assert len(first.history) == 3 and "stopped_early_after_epoch" not in first.extra  # 1 epoch since the best
    config = resume_config(load_checkpoint(out / "last.pt"), {"epochs": 8})
    second = train(config, None, out, resume=out / "last.pt", log=quiet, threads=1, evaluate_test=False)
    assert [row["epoch"] for row in second.history] == [1, 2, 3, 4]
    assert second.extra["stopped_early_after_epoch"] == 4


# ---- freeze_epochs -----------------------------------------------------------------------------------------------


def freeze_config(**overrides: object) -> TrainConfig:
    """resnet18 at width 4 (batch norm in the body), the head alone for 1 of 2 epochs, its LR twice the body's."""
    base = dict(
        model="resnet18", model_args={"width": 4}, epochs=2, freeze_epochs=1, warmup_epochs=0.5, head_lr_factor=2.0,
        batch_size=16, lr=0.05,
    )  # fmt: skip
    return small_config(**{**base, **overrides})


@pytest.mark.parametrize(("batches", "accum_steps"), [(5, 1), (10, 2), (9, 2)])
def test_body_lr_is_zero_while_frozen_then_warms_up(batches: int, accum_steps: int) -> None:
    """5 updates per epoch in each case (the schedule counts updates); warm-up 1 epoch = 5 updates. The constant
    schedule's own warm-up gives (u + 1) / 6 over updates 0..4; the body, frozen for epoch 1 (updates 0..4), then
    warms up over updates 5..9 as (u - 5 + 1) / 5; the head's LR is 2 x 0.1 throughout."""
    config = resolve_config(
        "seed", None,
        dict(model="resnet18", model_args={"width": 4}, epochs=3, freeze_epochs=1, warmup_epochs=1.0,
             head_lr_factor=2.0, lr=0.1, schedule="constant", accum_steps=accum_steps),
    )  # fmt: skip
    model = create_model("resnet18", num_classes=10, width=4)
    optimizer = optimizer_for(model, config, batches)
    body, head = optimizer.param_groups
    assert {id(p) for p in head["params"]} == {id(model.fc.weight), id(model.fc.bias)}
    assert len(body["params"]) == len(list(model.parameters())) - 2
    lr_fn, peaks = make_lr_fn(config, batches), [g["lr"] for g in optimizer.param_groups]
    assert peaks == pytest.approx([0.1, 0.2])
    expected_body = [0.0] * 5 + [0.02, 0.04, 0.06, 0.08, 0.1] + [0.1] * 5
    expected_head = [0.2 * (u + 1) / 6 for u in range(5)] + [0.2] * 10
    for update in range(15):
        set_lrs(optimizer, peaks, update, lr_fn(update))
        assert body["lr"] == pytest.approx(expected_body[update], abs=1e-12), update
        assert head["lr"] == pytest.approx(expected_head[update], abs=1e-12), update


def test_freeze_epochs_trains_the_head_alone_then_everything_and_resumes_exactly(
    tmp_path: Path, small_dir: Path, fetched: list[tuple[int, int]]
) -> None:
    """90 images in batches of 16: 6 per epoch. After epoch 1 every body weight and batch-norm statistic is the initial
    one (no gradient, eval mode) and the head has trained; after epoch 2 the body has trained too. A run stopped
    inside epoch 1, after it, and inside epoch 2, resumed each time, ends bit-identical to the straight run."""
    config = freeze_config()
    torch.manual_seed(config.seed)  # as the engine builds a fresh model
    initial = create_model("resnet18", num_classes=10, width=4).state_dict()
    straight, part = tmp_path / "straight", tmp_path / "part"
    train(config, str(small_dir), straight, log=quiet, threads=1, evaluate_test=False)

    stages = [(0, 1, (0, 2)), (0, 5, (1, 0)), (1, 2, (1, 3))]  # stop once (epoch, batch) trained -> last.pt at
    for i, (epoch, step, position) in enumerate(stages):
        fetched.clear()
        resume = part / "last.pt" if i else None
        result = train(
            config, str(small_dir), part, resume=resume, log=quiet, threads=1, evaluate_test=False,
            should_stop=stop_once_fetched(fetched, epoch, step),
        )  # fmt: skip
        ckpt = load_checkpoint(part / "last.pt")
        assert result.interrupted and (ckpt["epoch"], ckpt["batch_in_epoch"]) == position
        if position == (1, 0):  # after the frozen epoch
            for key, value in ckpt["model_state"].items():
                if key.startswith("fc."):
                    assert not torch.equal(value, initial[key]), key
                else:
                    assert torch.equal(value, initial[key]), key  # weights and running statistics alike
            body_group, head_group = ckpt["optimizer_state"]["param_groups"]
            assert body_group["lr"] == 0.0
            assert head_group["lr"] == pytest.approx(0.05 * 2.0)  # lr x head_lr_factor, the 3-update warm-up over
            assert ckpt["history"][0]["lr"] == head_group["lr"]
    train(config, str(small_dir), part, resume=part / "last.pt", log=quiet, threads=1, evaluate_test=False)

    a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(part / "last.pt")
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model_state"].items():
        assert torch.equal(value, b["model_state"][key]), key
        if not key.endswith("num_batches_tracked"):
            assert not torch.equal(value, initial[key]), key  # the body trained in epoch 2
    assert [r["val_loss"] for r in a["history"]] == [r["val_loss"] for r in b["history"]]


# ---- configurations refused --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(patience=2, val_split=0.0), "patience needs a validation split"),
        (dict(freeze_epochs=2, epochs=2), "freeze_epochs 2 must be below epochs 2"),
        (dict(freeze_epochs=3, epochs=2), "freeze_epochs 3 must be below epochs 2"),
        (dict(accum_steps=0), "accum_steps must be at least 1"),
        (dict(clip_grad=-1.0), "clip_grad must be >= 0"),
    ],
)
def test_invalid_training_controls_are_refused(overrides: dict, message: str) -> None:
    with pytest.raises(CifarCnnError, match=message):
        small_config(**overrides)


def test_accum_steps_above_the_batches_of_an_epoch_is_refused(tmp_path: Path, small_dir: Path) -> None:
    expected = r"accum_steps 4 is more than the 3 batches of an epoch \(90 training images, batch_size 32\)"
    with pytest.raises(CifarCnnError, match=expected):
        train(small_config(accum_steps=4), str(small_dir), tmp_path / "run", log=quiet, threads=1)
    assert not (tmp_path / "run" / "last.pt").exists()
