"""Optimizers beyond torch's own: Muon (orthogonalized momentum updates for conv filters) and the pairing of it with
Nesterov SGD for every other parameter, used by the airbench-style recipes."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def newton_schulz(g: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """Approximately orthogonalize a matrix (rows x cols) with a quintic Newton-Schulz iteration, in bf16."""
    a, b, c = 3.4445, -4.7750, 2.0315  # coefficients that converge fast from any spectrum in (0, 1]
    x = g.to(torch.bfloat16)
    x = x / (x.norm() + 1e-7)
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    for _ in range(steps):
        s = x @ x.T
        x = a * x + (b * s + c * (s @ s)) @ x
    return (x.T if transposed else x).float()


class Muon(torch.optim.Optimizer):
    """Nesterov momentum whose update, per filter bank, is replaced by its nearest orthogonal matrix.

    The filters' norm is held fixed (each step rescales a weight to norm sqrt(out_channels)), so the update size is
    set by the learning rate alone and weight decay is not needed for these weights.
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.24, momentum: float = 0.6) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(p.grad)
                update = p.grad.add(buf, alpha=group["momentum"])
                p.mul_(math.sqrt(p.size(0)) / p.norm())
                p.add_(newton_schulz(update.reshape(len(update), -1)).view_as(p), alpha=-group["lr"])


class OptimizerSet:
    """Several optimizers stepped as one (the engine sees one `param_groups` list and one state dict)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        states = state.get("optimizers")
        if not isinstance(states, list) or len(states) != len(self.optimizers):
            raise ValueError("optimizer state does not match this optimizer set")
        for opt, s in zip(self.optimizers, states):
            opt.load_state_dict(s)


def _head_names(model: nn.Module) -> set[str]:
    head = getattr(model, "head_name", None)
    return {n for n, _ in model.named_parameters() if head and (n == head or n.startswith(head + "."))}


def build_optimizer(
    model: nn.Module,
    name: str,
    *,
    lr: float,
    momentum: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    head_lr_factor: float = 1.0,
    muon_lr: float = 0.24,
    muon_momentum: float = 0.6,
    early_steps: int = 0,
    body_start: int = 0,
    body_warmup: int = 0,
) -> torch.optim.Optimizer | OptimizerSet:
    """The optimizer for `model`, with parameter groups:

    - head: the model's classifier head (`model.head_name`), LR x `head_lr_factor`;
    - early: parameters the model lists in `early_params`, trained only over the first `early_steps` steps with the
      LR falling linearly to 0 (the group's `decay_steps`);
    - with `body_start` > 0 (a body frozen for that many updates) the head is a group of its own whatever its LR
      factor, and every other group carries `start_step` = body_start and `warmup_steps` = body_warmup for the LR
      schedule (see engine.loop.set_lrs): their LR is 0 before it, then warms up;
    - the rest. With 'muon', conv filters (4-D weights) go to Muon and everything else to Nesterov SGD, each SGD
      group's weight decay divided by its LR factor so that every group decays by the same lr x weight_decay per step.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # one group when the LRs agree and the body is never frozen
    head = _head_names(model) & set(params) if head_lr_factor != 1.0 or body_start > 0 else set()
    early = set(getattr(model, "early_params", ())) & set(params)
    filters = {n for n, p in params.items() if p.ndim == 4} - head - early if name == "muon" else set()
    rest = [n for n in params if n not in head | early | filters]
    groups = []
    body = {"start_step": body_start, "warmup_steps": body_warmup} if body_start > 0 else {}
    for names, factor, extra in (
        (rest, 1.0, body),
        (sorted(head), head_lr_factor, {}),
        (sorted(early), 1.0, {"decay_steps": max(1, early_steps), **body}),
    ):
        if names:
            wd = weight_decay / factor if name == "muon" else weight_decay
            groups.append({"params": [params[n] for n in names], "lr": lr * factor, "weight_decay": wd, **extra})
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name in ("adam", "adamw"):
        cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
        return cls(groups, lr=lr, betas=(momentum if momentum > 0 else 0.9, 0.999))
    if name == "muon":
        sgd = torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
        if not filters:
            return sgd
        muon = Muon(
            [{"params": [params[n] for n in params if n in filters], **body}], lr=muon_lr, momentum=muon_momentum
        )
        return OptimizerSet([sgd, muon])
    raise ValueError(f"unknown optimizer {name!r}")
