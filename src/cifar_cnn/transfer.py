"""Transfer learning: start from another run's weights, replace or keep the classifier head, freeze the body.

The *head* is the module a model names as its classifier (its `head_name` attribute: `fc2` for seed_cnn, `fc` for
resnet18, `head` for airbench): the layer that maps features to class logits. Everything else is the *body*
(backbone). Head and body get their own learning rates through `head_lr_factor` (see cifar_cnn.optim).

`train --init-from CKPT` loads the body from CKPT, and the head too when the classes are the same (same names, same
order) and `--reset-head` is not given; with other classes the head keeps its fresh random initialization, sized for
the new data.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint import load_checkpoint
from .config import TrainConfig
from .errors import CifarCnnError


def is_head(param_name: str, head: str) -> bool:
    """Whether a parameter (or buffer) name belongs to the head module `head`."""
    return param_name == head or param_name.startswith(head + ".")


def check_head(model: nn.Module, model_name: str) -> str:
    """The head's name (the model's `head_name`), after checking that the model has such a module."""
    head = getattr(model, "head_name", None)
    if not head or not any(is_head(name, head) for name, _ in model.named_parameters()):
        raise CifarCnnError(
            f"model {model_name!r} names no classifier head (a `head_name` attribute naming its last layer), "
            "so it cannot be fine-tuned with a new head or a frozen body"
        )
    return head


def init_from_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    model_name: str,
    model_args: dict[str, Any],
    classes: list[str],
    reset_head: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Load a checkpoint's weights into `model` (a fresh `model_name` for `classes`); returns what was done.

    The head is taken from the checkpoint only when its classes equal `classes` and `reset_head` is false; otherwise
    it stays freshly initialized (sized for `classes`). Every body weight must be present with the same shape.
    """
    ckpt = load_checkpoint(path)
    source = ckpt["model"]["name"]
    if source != model_name:
        raise CifarCnnError(
            f"--init-from {path}: it holds a {source!r} model, this run builds {model_name!r}; pass --model {source}"
        )
    source_args = dict(ckpt["model"].get("args", {}))
    head = check_head(model, model_name)
    keep_head = list(ckpt["classes"]) == list(classes) and not reset_head
    state = {k: v for k, v in ckpt["model_state"].items() if keep_head or not is_head(k, head)}
    target = model.state_dict()
    for key, value in state.items():
        if key in target and target[key].shape != value.shape:
            raise CifarCnnError(
                f"--init-from {path}: weight {key} has shape {tuple(value.shape)} there but {tuple(target[key].shape)} "
                f"in this model; build the same architecture (its model_args: {source_args}, this run's: {model_args})"
            )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if keep_head or not is_head(k, head)]
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise CifarCnnError(f"--init-from {path}: weights do not fit model {model_name!r} ({what})")
    done = {
        "init_from": str(path),
        "source_classes": list(ckpt["classes"]),
        "head": head,
        "head_loaded": keep_head,
        "source_input_size": ckpt.get("input_size"),
    }
    reason = "same classes" if keep_head else ("--reset-head" if reset_head else "other classes")
    log(
        f"initialized from {path} ({source}, {len(ckpt['classes'])} classes); head {head!r} "
        + ("loaded" if keep_head else f"new, for {len(classes)} classes ({reason})")
    )
    return done


def freeze_body(model: nn.Module, head: str) -> int:
    """Stop training every parameter outside the head (freeze_backbone, for the whole run); returns how many
    parameters stay trainable. The body then runs in eval mode (see `train_mode`): its batch norm keeps, and
    normalizes with, the pretrained running statistics."""
    set_body_frozen(model, head, frozen=True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def set_body_frozen(model: nn.Module, head: str, frozen: bool) -> None:
    """Freeze (or unfreeze) every parameter outside the head, for `freeze_epochs`. The optimizer holds all of them
    throughout: a parameter without a gradient is left alone by SGD and Adam alike (no momentum, no weight decay)."""
    for name, p in model.named_parameters():
        if not is_head(name, head):
            p.requires_grad_(not frozen)


def train_mode(model: nn.Module, head: str, frozen: bool) -> None:
    """Training mode; with a frozen body, the body stays in eval mode: its batch norm normalizes with, and keeps, the
    pretrained running statistics (the head then learns on the features the body will give after unfreezing, not on
    batch statistics of a small data set), and its dropout is off."""
    model.train()
    if not frozen:
        return
    for name, module in model.named_modules():
        inside = is_head(name, head) or head.startswith(name + ".") or name == ""  # the head or a module holding it
        if not inside:
            module.training = False


def prepare_model(
    model: nn.Module,
    config: TrainConfig,
    classes: list[str],
    *,
    load_weights: bool,
    log: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """Apply a config's transfer settings to a fresh model: init_from (when `load_weights`: not when resuming, whose
    checkpoint brings its own weights) and freeze_backbone (a pretrained hf: model needs no init_from). Returns a
    summary for run.json, or None. (freeze_epochs is a phase of the run: see engine.state.enter_phase.)"""
    if not config.init_from and not config.freeze_backbone:
        return None
    summary: dict[str, Any] = {"init_from": config.init_from} if config.init_from else {}
    if load_weights and config.init_from:
        summary = init_from_checkpoint(
            model,
            config.init_from,
            model_name=config.model,
            model_args=dict(config.model_args),
            classes=classes,
            reset_head=config.reset_head,
            log=log,
        )
    if config.freeze_backbone:
        head = check_head(model, config.model)
        trainable = freeze_body(model, head)
        summary["trainable_parameters"] = trainable
        log(f"backbone frozen: training only {head!r} ({trainable} parameters)")
    return summary
