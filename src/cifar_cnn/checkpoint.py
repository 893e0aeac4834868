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
import math
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .atomic import atomic_write_bytes
from .calibration import check_temperature
from .choices import TTA_MODES
from .config import MAX_IMAGE_SIZE, quoted
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
MAX_CLASSES = 100_000  # ImageNet-21k has 21,843; a head beyond this is a damaged or hostile file
MAX_NAME_CHARS = 4096  # a class name, a model name (an hf: model's folder path)

# A checker returns what is wrong with a field's value (None: nothing). Every field present in a loaded checkpoint
# is checked (REQUIRED says which must be present), so no command trusts a type, a range or a size from the file:
# input_size 100000 would make predict allocate 20 GB, a string mean a traceback deep in normalization.
Check = Callable[[Any], "str | None"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int_in(low: int, high: int | None = None) -> Check:
    def check(v: Any) -> str | None:
        if _is_int(v) and v >= low and (high is None or v <= high):
            return None
        bound = f"in {low}..{high}" if high is not None else f"of at least {low}"
        return f"must be a whole number {bound}, got {quoted(v)}"

    return check


def _optional(check: Check) -> Check:
    return lambda v: None if v is None else check(v)


def _mapping(v: Any) -> str | None:
    return None if isinstance(v, dict) and all(isinstance(k, str) for k in v) else f"must be a mapping, got {quoted(v)}"


def _text(v: Any) -> str | None:
    return None if isinstance(v, str) and len(v) <= MAX_NAME_CHARS else f"must be a short text, got {quoted(v)}"


def _number(v: Any) -> str | None:  # a loss or metric: any float, inf included (no validation split: inf)
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)
    return None if ok else f"must be a number, got {quoted(v)}"


def _channel_stats(positive: bool) -> Check:
    def check(v: Any) -> str | None:
        numbers = isinstance(v, (list, tuple)) and len(v) == 3 and all(_is_number(x) for x in v)
        if numbers and (not positive or all(x > 0 for x in v)):
            return None
        kind = "positive finite numbers" if positive else "finite numbers"
        return f"must be 3 {kind} (one per channel), got {quoted(v)}"

    return check


def _classes(v: Any) -> str | None:
    if not isinstance(v, (list, tuple)) or not 1 <= len(v) <= MAX_CLASSES:
        return f"must be a list of 1..{MAX_CLASSES:,} class names, got {quoted(v)}"
    bad = next((c for c in v if not isinstance(c, str) or not 0 < len(c) <= MAX_NAME_CHARS), None)
    if bad is not None:
        return f"must be names (non-empty texts), but one is {quoted(bad)}"
    if len(set(v)) != len(v):
        twice = next(c for i, c in enumerate(v) if c in v[:i])
        return f"must be different names, but {quoted(twice)} appears twice"
    return None


def _model(v: Any) -> str | None:
    if not isinstance(v, dict) or not isinstance(v.get("name"), str) or not 0 < len(v["name"]) <= MAX_NAME_CHARS:
        return f"must be a mapping with the model's name, got {quoted(v)}"
    if _mapping(v.get("args", {})) is not None:
        return f"args must be a mapping of argument names to values, got {quoted(v.get('args'))}"
    hf = v.get("hf")
    if hf is not None and not (isinstance(hf, dict) and all(_mapping(hf.get(k)) is None for k in HF_RECORD)):
        return f"hf must be a mapping holding {' and '.join(HF_RECORD)} mappings, got {quoted(hf)}"
    return None


HF_RECORD = ("config", "preprocessor")  # what models.hf rebuilds an hf: network from


def _tta(v: Any) -> str | None:
    return None if v in TTA_MODES else f"must be one of {', '.join(TTA_MODES)}, got {quoted(v)}"


def _temperature(v: Any) -> str | None:
    ok = _is_number(v) and v > 0
    return None if ok else f"must be a positive finite number, got {quoted(v)}"


def _calibration(v: Any) -> str | None:
    if _mapping(v) is not None:
        return _mapping(v)
    by_tta = v.get("temperature_by_tta", {})
    if _mapping(by_tta) is not None or any(_tta(k) or _temperature(t) for k, t in by_tta.items()):
        return f"temperature_by_tta must map test-time augmentations to temperatures, got {quoted(by_tta)}"
    return None


def _data_source(v: Any) -> str | None:
    if _mapping(v) is not None or _text(v.get("path")) is not None:
        return f"must be a mapping with the data's path, got {quoted(v)}"
    if any(_optional(_mapping)(v.get(k)) for k in ("options", "fingerprint")):
        return f"options and fingerprint must be mappings, got {quoted(v)}"
    return None


def _rng_state(v: Any) -> str | None:
    tensors = isinstance(v, dict) and all(torch.is_tensor(t) and t.dtype == torch.uint8 for t in v.values())
    return None if tensors and "torch" in v else f"must map devices to byte tensors, got {quoted(v)}"


def _ema_state(v: Any) -> str | None:
    if not isinstance(v, dict) or not _is_int(v.get("updates")) or not isinstance(v.get("weights"), dict):
        return f"must be a mapping with updates and weights, got {quoted(v)}"
    return None


def _epoch_totals(v: Any) -> str | None:
    ok = (
        isinstance(v, dict)
        and set(v) == {"loss_sum", "correct", "seen"}
        and all(_number(x) is None for x in v.values())
    )
    return None if ok else f"must be a mapping of loss_sum, correct and seen, got {quoted(v)}"


def _history(v: Any) -> str | None:
    ok = isinstance(v, list) and all(_mapping(row) is None for row in v)
    return None if ok else f"must be a list of mappings (one per epoch), got {quoted(v)}"


SCHEMA: dict[str, Check] = {
    "format_version": _int_in(1),
    "model": _model,
    "classes": _classes,
    "num_classes": _int_in(1, MAX_CLASSES),
    "input_size": _int_in(8, MAX_IMAGE_SIZE),
    "mean": _channel_stats(positive=False),
    "std": _channel_stats(positive=True),
    "tta": _tta,
    # temperature: checked by checkpoint_temperature when loaded (calibration.check_temperature's own message)
    "calibration": _calibration,
    "config": _mapping,
    "data_source": _optional(_data_source),
    "epoch": _int_in(0),
    "step": _int_in(0),
    "batch_in_epoch": _int_in(0),
    "threads": _optional(_int_in(1)),
    "metrics": _mapping,
    "history": _history,
    "best_val_loss": _number,
    "optimizer_state": _optional(_mapping),
    "scheduler_state": _optional(_mapping),
    "scaler_state": _optional(_mapping),
    "ema_state": _optional(_ema_state),
    "rng_state": _rng_state,
    "epoch_totals": _optional(_epoch_totals),
    **{k: _optional(_text) for k in ("created", "note", "package_version", "torch_version")},
}


def check_field(ckpt: dict[str, Any], name: str, path: Path) -> None:
    """One field of a loaded checkpoint against SCHEMA (absent: nothing to check), as a one-line error."""
    if name in ckpt and name in SCHEMA and (problem := SCHEMA[name](ckpt[name])) is not None:
        raise CifarCnnError(f"{path}: its {name} {problem}; the checkpoint is damaged or was not written by cifar-cnn")


def check_fields(ckpt: dict[str, Any], path: Path) -> None:
    """Every field of a loaded checkpoint against SCHEMA, and the class count against num_classes."""
    for name in SCHEMA:
        check_field(ckpt, name, path)
    if "num_classes" in ckpt and ckpt["num_classes"] != len(ckpt["classes"]):
        raise CifarCnnError(
            f"{path}: its num_classes {ckpt['num_classes']} differs from its {len(ckpt['classes'])} class names; "
            "the checkpoint is damaged"
        )


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
    check_field(ckpt, "format_version", p)
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise CifarCnnError(
            f"{p}: checkpoint format version {ckpt.get('format_version')} is newer than this cifar-cnn understands "
            f"({FORMAT_VERSION}); upgrade cifar-cnn"
        )
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise CifarCnnError(f"{p}: checkpoint lacks {', '.join(missing)}; it is damaged or incomplete")
    check_fields(ckpt, p)
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
