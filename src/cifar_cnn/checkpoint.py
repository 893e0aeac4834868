"""Checkpoints that describe themselves, written atomically and loaded without running pickled code.

A checkpoint is a dict of plain types and tensors:
    format, format_version      the tag that says this is one of ours
    model: {name, args[, hf]}   what rebuilds the network (with the registry; hf: an hf: model's config, see models.hf)
    num_classes, classes        label order
    input_size, mean, std       preprocessing
    tta                         the test-time augmentation the recipe evaluates with
    temperature                 probabilities are softmax(logits / temperature) (absent: 1.0; `cifar-cnn calibrate`)
    calibration                 how the temperature was fitted: {split, num_images, nll_before, nll_after, ...}
    config                      the resolved TrainConfig as a dict
    data_source                 {path, options, fingerprint}: the data the run trained on (cifar_cnn.data.DataSource)
    epoch, step, batch_in_epoch where training stood (batch_in_epoch > 0: saved inside an epoch)
    metrics                     the epoch's metrics; best_val_loss
    model_state                 state dict without 'module.' / '_orig_mod.' prefixes (best.pt with EMA: the average)
    ema_state                   last.pt with EMA: {decay, warmup, updates, weights} of the average, to resume
    optimizer_state, scaler_state (fp16 loss scaling), scheduler_state, rng_state
    created, package_version, torch_version, note
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_write_bytes
from .calibration import check_temperature
from .errors import CifarCnnError

FORMAT = "cifar-cnn-checkpoint"
FORMAT_VERSION = 1


def model_spec(name: str, args: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    """A checkpoint's `model` entry: the name and builder arguments, and for an hf: model its record (config with
    the run's labels, preprocessing, origin), which rebuilds the network with no files and no network."""
    spec: dict[str, Any] = {"name": name, "args": dict(args)}
    record = getattr(model, "hf_record", None)
    if record is not None:
        spec["hf"] = record
    return spec


def unwrap_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with the prefixes that DDP and torch.compile add removed."""
    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner)
    return {k: v.detach().cpu().clone() for k, v in inner.state_dict().items()}


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Save `payload` (see the module doc) with the format tag, atomically."""
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, **payload}
    buf = io.BytesIO()
    torch.save(payload, buf)  # serialize in memory: torch's zip writer reports a full disk as a RuntimeError
    try:
        atomic_write_bytes(Path(path), lambda f: f.write(buf.getbuffer()))
    except OSError as exc:
        raise CifarCnnError(
            f"could not write checkpoint {path} ({exc.strerror or exc}); the previous file is intact"
        ) from None


REQUIRED = ("model", "classes", "model_state", "mean", "std", "input_size")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and check a checkpoint. Uses torch's weights-only unpickler, so a crafted file cannot run code."""
    p = Path(path)
    if not p.is_file():
        raise CifarCnnError(f"{p}: no such checkpoint file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols of files it then refuses anyway
            ckpt = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # torch.load raises many types on foreign or damaged files (KeyError, EOFError, ...)
        raise CifarCnnError(f"{p}: not a cifar-cnn checkpoint, or a damaged one ({_load_failure(e)})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CifarCnnError(
            f"{p}: not a cifar-cnn checkpoint (no '{FORMAT}' format tag); train one with `cifar-cnn train`"
        )
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise CifarCnnError(
            f"{p}: checkpoint format version {ckpt.get('format_version')} is newer than this cifar-cnn understands "
            f"({FORMAT_VERSION}); upgrade cifar-cnn"
        )
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CifarCnnError(f"{p}: checkpoint lacks {', '.join(missing)}; it is damaged or incomplete")
    check_weights(ckpt["model_state"], p)
    checkpoint_temperature(ckpt, p)
    return ckpt


def checkpoint_temperature(ckpt: dict[str, Any], path: str | Path = "checkpoint", tta: str | None = None) -> float:
    """The checkpoint's softmax temperature (1.0 when it was never calibrated), checked to be finite and positive.
    `tta`: the test-time augmentation the logits are computed with, when it is not the checkpoint's own: the
    temperature `calibrate` fitted for that mode if it fitted one (it does for 'none'), else the checkpoint's."""
    record = ckpt.get("calibration")
    by_tta = record.get("temperature_by_tta") if isinstance(record, dict) else None
    if tta is not None and isinstance(by_tta, dict) and tta in by_tta:
        return check_temperature(by_tta[tta], f"{path} (its temperature for tta {tta})")
    return check_temperature(ckpt.get("temperature", 1.0), str(path))


def check_weights(state: Any, path: Path) -> None:
    """A checkpoint's weights: a mapping of names to tensors, every floating-point one finite (NaN weights would give
    NaN logits: `predict --json` would print `NaN`, which is not JSON, and serve null probabilities)."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise CifarCnnError(f"{path}: its model_state is not a mapping of weight names to tensors; it is damaged")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise CifarCnnError(
            f"{path}: its weights hold NaN or infinite values ({bad[0][:80]}{more}): the run diverged; train again "
            "with a lower --lr, or use an earlier checkpoint"
        )


def _load_failure(exc: Exception) -> str:
    """A short reason for a failed torch.load, instead of torch's page-long message."""
    text = str(exc)
    if "Weights only load failed" in text:
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
        if found:
            return f"it refers to {found.group(1)}; refusing to unpickle it, since that could run code"
        return "not a torch checkpoint file"
    if "PytorchStreamReader" in text or "zip archive" in text:
        return "truncated or corrupt file"
    first = text.strip().splitlines()[0][:160] if text.strip() else type(exc).__name__
    return f"{type(exc).__name__}: {first}"


def state_dict_mismatch(exc: RuntimeError) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if line.startswith(("size mismatch", "Missing key", "Unexpected key"))]
    return (useful or lines or ["state dict mismatch"])[0][:200]


def model_from_checkpoint(ckpt: dict[str, Any], path: str | Path = "checkpoint") -> nn.Module:
    """Rebuild the network a checkpoint describes and load its weights (in eval mode)."""
    from .models import create_model

    spec = ckpt["model"]
    model = create_model(
        spec["name"],
        num_classes=len(ckpt["classes"]),
        classes=list(ckpt["classes"]),
        record=spec.get("hf"),
        **dict(spec.get("args", {})),
    )
    try:
        model.load_state_dict(ckpt["model_state"])
    except RuntimeError as exc:
        raise CifarCnnError(f"{path}: weights do not fit model {spec['name']!r} ({state_dict_mismatch(exc)})") from None
    return model.eval()


def describe(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A JSON-ready summary of a checkpoint (no tensors)."""
    return {
        "model": ckpt["model"]["name"],
        "model_args": dict(ckpt["model"].get("args", {})),
        "classes": list(ckpt["classes"]),
        "input_size": ckpt["input_size"],
        "mean": list(ckpt["mean"]),
        "std": list(ckpt["std"]),
        "tta": ckpt.get("tta", "none"),
        "temperature": checkpoint_temperature(ckpt),
        "epoch": ckpt.get("epoch"),
        "step": ckpt.get("step"),
        "metrics": ckpt.get("metrics", {}),
        "note": ckpt.get("note", ""),
        "package_version": ckpt.get("package_version"),
        "torch_version": ckpt.get("torch_version"),
        "created": ckpt.get("created"),
        "parameters": int(
            sum(v.numel() for k, v in ckpt["model_state"].items() if "running_" not in k and "num_batches" not in k)
        ),
    }
