"""Exponential moving average of a model's weights (Polyak averaging), kept beside the trained model.

After every optimizer step each floating-point tensor of the model's state (parameters and batch-norm statistics)
moves into the average: avg = d * avg + (1 - d) * w. With warm-up the decay of update t is min(decay, (1 + t) /
(10 + t)), so the first updates are not dominated by the random initial weights. Integer buffers (batch-norm's
step counter) are copied. The average does not change training; validation, best.pt and the test use it.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


def ema_decay_at(updates: int, decay: float, warmup: bool = True) -> float:
    """The decay used by update number `updates` (1 for the first)."""
    return min(decay, (1 + updates) / (10 + updates)) if warmup else decay


class WeightEMA:
    """`module` is a copy of the model that holds the averaged weights; it is always in eval mode."""

    def __init__(self, model: nn.Module, decay: float, warmup: bool = True) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.warmup, self.updates = decay, warmup, 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = ema_decay_at(self.updates, self.decay, self.warmup)
        for avg, w in zip(self.module.state_dict().values(), model.state_dict().values()):
            if avg.is_floating_point():
                avg.lerp_(w.detach().to(avg.dtype), 1.0 - d)
            else:
                avg.copy_(w)

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "warmup": self.warmup,
            "updates": self.updates,
            "weights": self.module.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["weights"])
