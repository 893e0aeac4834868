"""What a run saves: best.pt and last.pt payloads (self-describing, written atomically by cifar_cnn.checkpoint)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..checkpoint import model_spec, save_checkpoint, unwrap_state_dict
from ..hooks import EpochTotals
from ..rundir import RunPaths, now
from ..version import __version__
from .state import RunState


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


class Checkpointer:
    """Writes a run's checkpoints. `final` ones (best.pt) hold the weights that are evaluated (the average, with EMA);
    the others (last.pt) hold the trained weights, the average beside them and everything resuming needs."""

    def __init__(self, paths: RunPaths, state: RunState) -> None:
        self.paths, self.state = paths, state
        self.on_saved: Callable[[], None] | None = None  # told after every checkpoint (the run's files follow it)
        data, config = state.data, state.config
        self.common = dict(
            model=model_spec(config.model, dict(config.model_args), state.model),
            classes=list(data.splits.classes),
            num_classes=len(data.splits.classes),
            input_size=data.input_size,
            mean=[float(v) for v in data.mean],
            std=[float(v) for v in data.std],
            tta=config.tta,
            config=config.to_dict(),
            data_source=data.record(),
            package_version=__version__,
            torch_version=str(torch.__version__),
            threads=torch.get_num_threads(),
        )

    def payload(
        self,
        epoch: int,
        batch_in_epoch: int,
        metrics: dict[str, Any],
        note: str,
        totals: EpochTotals | None,
        final: bool = False,
    ) -> dict[str, Any]:
        s = self.state
        if final and s.ema is not None:
            note += f" (exponential moving average of the weights, decay {s.ema.decay})"
        step = epoch * s.steps_per_epoch + batch_in_epoch
        return {
            **self.common,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "step": step,
            "metrics": metrics,
            "history": [dict(r) for r in s.history],
            "best_val_loss": s.best_val_loss,
            "model_state": unwrap_state_dict(s.eval_model if final else s.model),
            "ema_state": s.ema.state_dict() if s.ema is not None and not final else None,
            "optimizer_state": s.optimizer.state_dict(),
            "scaler_state": s.scaler.state_dict() if s.scaler is not None else None,
            "scheduler_state": {"schedule": s.config.schedule, "step": step},
            "rng_state": rng_state(s.device),
            "epoch_totals": totals.as_dict() if totals else None,
            "created": now(),
            "note": note,
        }

    def save_interrupted(self, epoch: int, next_step: int, totals: EpochTotals) -> None:
        """last.pt saved inside an epoch, with the position and the epoch's running totals."""
        save_checkpoint(self.paths.last, self.payload(epoch, next_step, {}, "interrupted inside an epoch", totals))
        self._saved()

    def _saved(self) -> None:
        if self.on_saved is not None:
            self.on_saved()

    def save_epoch_end(self, epoch: int, metrics: dict[str, Any], improved: bool) -> None:
        """After epoch `epoch` (1-based, completed): best.pt when validation improved (every epoch without a
        validation split), then last.pt."""
        if improved:
            save_checkpoint(
                self.paths.best, self.payload(epoch, 0, metrics, "lowest validation loss so far", None, True)
            )
        elif metrics.get("val_loss") is None:
            note = "final weights (no validation split)"
            save_checkpoint(self.paths.best, self.payload(epoch, 0, metrics, note, None, True))
        save_checkpoint(self.paths.last, self.payload(epoch, 0, metrics, "end of epoch", None))
        self._saved()
