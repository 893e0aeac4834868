"""Export a checkpoint to ONNX or TorchScript and check the exported model against PyTorch on real test images.

The exported model takes float32 images already normalized with the checkpoint's mean and std, shape
(batch, 3, S, S) with a dynamic batch size, and returns raw logits (batch, classes). It runs without test-time
augmentation. Beside FILE, FILE.json records the class names, normalization, input size and the parity check:
the largest absolute logit difference from PyTorch and the top-1 agreement on `num_images` test images.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .atomic import atomic_write_bytes, atomic_write_text
from .checkpoint import load_checkpoint, model_from_checkpoint
from .choices import EXPORT_FORMATS, EXPORT_TOLERANCE, check_choice
from .data import load_dataset
from .data.pipeline import resize_batch
from .data.preprocess import normalize
from .device import set_threads
from .errors import CifarCnnError
from .evaluate import predict_logits
from .onnx_predict import METADATA_KEY
from .rundir import resolve_source
from .version import __version__

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
TTA_NOTE = "exported models run without test-time augmentation (TTA); the checkpoint's TTA mode is {tta!r}"


def _metadata(ckpt: dict[str, Any], fmt: str) -> dict[str, Any]:
    return {
        "format": fmt,
        "model": ckpt["model"]["name"],
        "classes": list(ckpt["classes"]),
        "mean": [float(v) for v in ckpt["mean"]],
        "std": [float(v) for v in ckpt["std"]],
        "input_size": int(ckpt["input_size"]),
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", 3, int(ckpt["input_size"]), int(ckpt["input_size"])],
            "dtype": "float32",
            "preprocessing": "RGB, shorter side resized to input_size, centre crop, x / 255, (x - mean) / std",
        },
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(ckpt["classes"])], "meaning": "raw logits"},
        "tta": "none",
        "note": TTA_NOTE.format(tta=ckpt.get("tta", "none")),
    }


def export_onnx(model: nn.Module, example: torch.Tensor, out: Path, metadata: dict[str, Any]) -> None:
    """torch.onnx (the torch.export-based exporter) with a dynamic batch dimension; metadata stored in the file."""
    try:
        import onnx  # noqa: F401  (the exporter needs onnx and onnxscript; say so before it fails obscurely)
        import onnxscript  # noqa: F401
    except ImportError:
        raise CifarCnnError("ONNX export needs onnx and onnxscript: pip install -e '.[export]'") from None
    quiet = logging.getLogger("torch.onnx")  # it logs a warning per torchvision operator it cannot register
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):  # the exporter prints progress
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            None,
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=False,
            verbose=False,
        )
    quiet.setLevel(level)
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    atomic_write_bytes(out, lambda f: f.write(proto.SerializeToString()))


def export_torchscript(model: nn.Module, example: torch.Tensor, out: Path, metadata: dict[str, Any]) -> None:
    """torch.jit.trace (these CNNs have no data-dependent control flow); metadata as an extra file in the archive."""
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch 2.13 marks torch.jit deprecated; TorchScript files still load in C++
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, buf, _extra_files={f"{METADATA_KEY}.json": json.dumps(metadata)})
    atomic_write_bytes(out, lambda f: f.write(buf.getvalue()))


def exported_logits(fmt: str, path: Path, x: torch.Tensor, batch_size: int) -> np.ndarray:
    """Run the exported file on normalized float32 images, `batch_size` at a time, in its own runtime."""
    chunks = []
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for i in range(0, len(x), batch_size):
            chunks.append(session.run(None, {INPUT_NAME: x[i : i + batch_size].numpy()})[0])
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = torch.jit.load(str(path), map_location="cpu")
        with torch.inference_mode():
            for i in range(0, len(x), batch_size):
                chunks.append(loaded(x[i : i + batch_size]).float().numpy())
    return np.concatenate(chunks).astype(np.float32)


def parity(
    model: nn.Module, ckpt: dict[str, Any], fmt: str, path: Path, images: np.ndarray, batch_size: int = 250
) -> dict[str, Any]:
    """Max absolute logit difference and top-1 agreement between PyTorch (fp32, no TTA) and the exported model.

    The exported model is run at batch size `batch_size` and again at 1 (on the first images), which checks the
    dynamic batch dimension too."""
    mean, std, size = tuple(ckpt["mean"]), tuple(ckpt["std"]), int(ckpt["input_size"])
    reference = predict_logits(
        model, images, mean, std, batch_size=batch_size, precision="fp32", tta="none", size=size
    ).numpy()
    x = resize_batch(normalize(torch.from_numpy(np.ascontiguousarray(images)), mean, std), size)
    got = exported_logits(fmt, path, x, batch_size)
    single = exported_logits(fmt, path, x[:8], 1)
    diff = float(np.abs(got - reference).max())
    diff_single = float(np.abs(single - reference[:8]).max())
    agree = float((got.argmax(1) == reference.argmax(1)).mean())
    return {
        "num_images": int(len(images)),
        "max_abs_logit_diff": max(diff, diff_single),
        "top1_agreement": agree,
        "batch_sizes_checked": [batch_size, 1],
        "precision": "fp32",
    }


def export_checkpoint(
    checkpoint: str | Path,
    fmt: str,
    out: str | Path,
    *,
    data: str | None = None,
    num_images: int = 1000,
    tolerance: float = EXPORT_TOLERANCE,
    threads: int | None = None,
    home: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Export `checkpoint` to `out` as 'onnx' or 'torchscript', check parity on `num_images` test images of `data`
    (default: the data it was trained on, from run.json) and write OUT.json. Returns the OUT.json content; its
    'parity_ok' says whether the difference is within `tolerance` and every top-1 label agrees."""
    check_choice(fmt, EXPORT_FORMATS, "--format")
    if num_images < 1:
        raise CifarCnnError(f"--num-images must be at least 1, got {num_images}")
    checkpoint, out = Path(checkpoint), Path(out)
    if not out.parent.is_dir():
        raise CifarCnnError(f"--out {out}: folder {out.parent} does not exist")
    set_threads(threads)
    ckpt = load_checkpoint(checkpoint)
    source = resolve_source(data, ckpt, checkpoint.parent, default=None)
    if source is None:
        raise CifarCnnError(
            f"{checkpoint}: its training data is unknown (no record in it, no run.json beside it); give --data SOURCE "
            "so the exported model can be checked against PyTorch on real test images"
        )
    data = str(source)
    model = model_from_checkpoint(ckpt, checkpoint).float().eval()
    size = int(ckpt["input_size"])
    ds = load_dataset(source, size, home=home, threads=threads, log=log)
    if list(ds.classes) != list(ckpt["classes"]):
        raise CifarCnnError(f"--data {data}: its classes {ds.classes} differ from the checkpoint's {ckpt['classes']}")
    images = ds.test_images[:num_images]
    if len(images) == 0:
        raise CifarCnnError(f"--data {data}: no test images to check the exported model on")

    metadata = _metadata(ckpt, fmt)
    example = torch.zeros(2, 3, size, size)
    log(f"exporting {checkpoint} ({ckpt['model']['name']}) to {fmt}: {out}")
    exporter = export_onnx if fmt == "onnx" else export_torchscript
    try:
        exporter(model, example, out, metadata)
    except CifarCnnError:
        raise
    except Exception as exc:  # an exporter failure names an operator or a shape; keep its first line
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CifarCnnError(f"{fmt} export of {checkpoint} failed: {first}") from None

    check = parity(model, ckpt, fmt, out, images)
    check.update(data=str(data), tolerance=tolerance)
    ok = check["max_abs_logit_diff"] <= tolerance and check["top1_agreement"] == 1.0
    report = {
        **metadata,
        "file": out.name,
        "checkpoint": str(checkpoint),
        "parity": check,
        "parity_ok": ok,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "package_version": __version__,
        "torch_version": torch.__version__,
    }
    if ds.skipped:
        report["skipped_images"] = len(ds.skipped)  # label rows left out with --skip-bad
    atomic_write_text(Path(f"{out}.json"), json.dumps(report, indent=2) + "\n")
    log(
        f"parity on {check['num_images']} test images of {data}: max abs logit difference "
        f"{check['max_abs_logit_diff']:.2e}, top-1 agreement {100 * check['top1_agreement']:.2f}% "
        f"({'ok' if ok else 'NOT within tolerance ' + format(tolerance, 'g')}); wrote {out} and {out}.json"
    )
    log(metadata["note"])
    return report
