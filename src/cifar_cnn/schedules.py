"""Learning-rate schedules as small pure functions: step number -> multiplier of the peak learning rate.

A schedule has no state of its own, so resuming needs only the step count (nanoGPT's get_lr, in spirit).
"""

from __future__ import annotations

import math

from .choices import SCHEDULES


def lr_multiplier(
    step: int,
    total_steps: int,
    schedule: str = "constant",
    warmup_steps: int = 0,
    final_fraction: float = 0.0,
    step_size: int = 1,
    gamma: float = 0.1,
) -> float:
    """Multiplier in [0, 1] for optimizer step `step` (0-based) of `total_steps`.

    - constant: 1 after the warm-up.
    - linear: warm-up, then a straight line from 1 down to `final_fraction` at the last step.
    - cosine: warm-up, then half a cosine from 1 down to `final_fraction`.
    - onecycle: half a cosine up from `final_fraction` to 1 over the warm-up (30% of the steps if none is given),
      then half a cosine down to `final_fraction`.
    - step: warm-up, then multiplied by `gamma` every `step_size` steps.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    total_steps = max(1, total_steps)
    if schedule == "onecycle":
        up = warmup_steps if warmup_steps > 0 else max(1, round(0.3 * total_steps))
        if step < up:
            return final_fraction + (1 - final_fraction) * (1 - math.cos(math.pi * step / up)) / 2
        progress = min(1.0, (step - up) / max(1, total_steps - 1 - up))
        return final_fraction + (1 - final_fraction) * (1 + math.cos(math.pi * progress)) / 2
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    after = step - warmup_steps
    span = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, after / span)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 + (final_fraction - 1.0) * progress
    if schedule == "cosine":
        return final_fraction + (1 - final_fraction) * (1 + math.cos(math.pi * progress)) / 2
    return gamma ** (after // max(1, step_size))
