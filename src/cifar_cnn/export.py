"""Export a checkpoint to ONNX or TorchScript and check the exported model against PyTorch on real test images.

The exported model takes float32 images already normalized with the checkpoint's mean and std, shape
(batch, 3, S, S) with a dynamic batch size, and returns raw logits (batch, classes); the checkpoint's softmax
temperature travels in the metadata for the predictor to apply. It runs without test-time augmentation. Beside FILE,
FILE.json records the class names, normalization, input size and the parity check: the largest absolute logit
difference from PyTorch and the top-1 agreement on `num_images` test images.

With `int8`, the float ONNX model is quantized statically by onnxruntime (int8 per-channel weights, uint8 activations
calibrated on training images) and kept only when its top-1 accuracy on test images is within `max_accuracy_drop`
points of the float model's (the gate); otherwise nothing is written and `AccuracyGateFailed` is raised.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import io
import json
import logging
import math
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .atomic import atomic_write_bytes, atomic_write_text
from .checkpoint import checkpoint_temperature, load_checkpoint, model_from_checkpoint
from .choices import EXPORT_FORMATS, EXPORT_TOLERANCE, check_choice
from .data import Dataset, load_dataset
from .data.dataset import Images, take
from .data.pipeline import resize_batch
from .data.preprocess import normalize
from .device import set_threads
from .errors import CifarCnnError
from .evaluate import checkpoint_splits, predict_logits
from .onnx_predict import METADATA_KEY
from .rundir import resolve_source
from .version import __version__

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
TTA_NOTE = "exported models run without test-time augmentation (TTA); the checkpoint's TTA mode is {tta!r}"
# QuantizeLinear/DequantizeLinear pairs, onnxruntime's recommended format: as fast as QOperator here (the runtime fuses
# the pairs into the same QLinearConv kernels; benchmarks/int8_bench.py measures both) and readable by other runtimes
# (unless GELUs run in int8, through onnxruntime's contrib operators: see gelu_in_int8 and --standard-onnx)
QUANT_FORMAT = "QDQ"
CALIBRATION_SEED = 0  # which training images calibrate the activation ranges: fixed, so an export can be repeated
CALIBRATION_BATCH = 64
GATE_SEED = 0  # which test images the int8 gate scores: fixed, spread over the split (which is stored by class)


class AccuracyGateFailed(CifarCnnError):
    """The int8 model lost more top-1 accuracy than allowed; nothing was written (exit code 1)."""

    exit_code = 1


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
        "temperature": checkpoint_temperature(ckpt, tta="none"),  # softmax(logits / T), for logits without TTA
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
    write_onnx(program.model_proto, out, metadata)


def write_onnx(proto: Any, out: Path, metadata: dict[str, Any]) -> None:
    """Store `metadata` as the model's cifar_cnn metadata entry (replacing one there) and write it atomically."""
    kept = [(p.key, p.value) for p in proto.metadata_props if p.key != METADATA_KEY]
    del proto.metadata_props[:]
    for key, value in [*kept, (METADATA_KEY, json.dumps(metadata))]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    atomic_write_bytes(out, lambda f: f.write(proto.SerializeToString()))


def export_torchscript(model: nn.Module, example: torch.Tensor, out: Path, metadata: dict[str, Any]) -> None:
    """torch.jit.trace (these CNNs have no data-dependent control flow); metadata as an extra file in the archive."""
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch 2.13 marks torch.jit deprecated; TorchScript files still load in C++
        traced = torch.jit.trace(model, example, check_trace=False)
        torch.jit.save(traced, buf, _extra_files={f"{METADATA_KEY}.json": json.dumps(metadata)})
    atomic_write_bytes(out, lambda f: f.write(buf.getvalue()))


def model_inputs(images: np.ndarray, ckpt: dict[str, Any]) -> torch.Tensor:
    """uint8 images (N, 3, h, w) as the exported model takes them: normalized float32, resized to the input size."""
    x = normalize(torch.from_numpy(np.ascontiguousarray(images)), tuple(ckpt["mean"]), tuple(ckpt["std"]))
    return resize_batch(x, int(ckpt["input_size"]))


def onnx_session(path: Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session with its default graph optimizations (`threads`: intra-op threads, None: all)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def exported_logits(fmt: str, path: Path, x: torch.Tensor, batch_size: int) -> np.ndarray:
    """Run the exported file on normalized float32 images, `batch_size` at a time, in its own runtime."""
    chunks = []
    if fmt == "onnx":
        session = onnx_session(path)
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
    x = model_inputs(images, ckpt)
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


def calibration_images(ds: Dataset, ckpt: dict[str, Any], count: int) -> Images:
    """`count` images (all, when there are fewer) drawn with a fixed seed from the training split of the checkpoint's
    run (its validation images stay out, as in training), in data set order."""
    train = checkpoint_splits(ds, ckpt).train_images
    if len(train) == 0:
        raise CifarCnnError("--int8: the data has no training images to calibrate the quantized model on")
    rng = np.random.default_rng(CALIBRATION_SEED)
    return take(train, np.sort(rng.choice(len(train), size=min(count, len(train)), replace=False)))


def _calibration_reader(images: Images, ckpt: dict[str, Any]) -> Any:
    """An onnxruntime CalibrationDataReader giving `images` as the model's input, CALIBRATION_BATCH at a time."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.starts = iter(range(0, len(images), CALIBRATION_BATCH))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self.starts, None)
            if start is None:
                return None
            return {INPUT_NAME: model_inputs(images[start : start + CALIBRATION_BATCH], ckpt).numpy()}

    return Reader()


def bn_before_maxpool(graph: Any) -> int:
    """Rewrite MaxPool -> BatchNormalization as BatchNormalization -> MaxPool wherever the batch norm's scale
    (weight / sqrt(var + eps)) is positive in every channel; returns how many were moved.

    An increasing map per channel commutes with a max, so the outputs are unchanged; the batch norm then folds into
    the conv before the pool (quant_pre_process fuses Conv + BN), which leaves no float op and no layout transposes
    between an int8 conv and its pool. airbench's conv groups (conv, pool, BN with its scale frozen at 1) have this
    shape: 7-12% more int8 img/s for the quick model, measured."""
    from onnx import numpy_helper

    consts = {t.name: t for t in graph.initializer}
    producer = {name: node for node in graph.node for name in node.output}
    uses = collections.Counter(name for node in graph.node for name in node.input)
    uses.update(o.name for o in graph.output)
    position = {node.output[0]: float(i) for i, node in enumerate(graph.node) if node.output}
    moved = 0
    for bn in graph.node:
        pool = producer.get(bn.input[0]) if bn.op_type == "BatchNormalization" else None
        if pool is None or pool.op_type != "MaxPool" or len(pool.output) != 1 or len(bn.output) != 1:
            continue
        if uses[pool.output[0]] != 1 or not all(name in consts for name in bn.input[1:5]):
            continue
        weight, var = (numpy_helper.to_array(consts[n]).astype(np.float64) for n in (bn.input[1], bn.input[4]))
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        if not np.all(weight / np.sqrt(var + eps) > 0):
            continue
        pooled, before_pool = pool.output[0], f"{bn.output[0]}_before_pool"
        bn.input[0], bn.output[0], pool.input[0], pool.output[0] = pool.input[0], before_pool, before_pool, bn.output[0]
        position[before_pool] = position.pop(pooled) - 0.5  # keep topological order: the batch norm just before
        position[pool.output[0]] = position[before_pool] + 0.5
        kept = [v for v in graph.value_info if v.name != pooled]  # that tensor is gone; its shape must not linger
        del graph.value_info[:]
        graph.value_info.extend(kept)
        moved += 1
    if moved:
        graph.node.sort(key=lambda node: position[node.output[0]])
    return moved


GELU_SIGMOID_SLOPE = 1.702  # GELU(x) ~ x * sigmoid(1.702 x) (Hendrycks and Gimpel, 2016): within 0.021 everywhere


def _gelu_chain(nodes: list[Any], i: int, graph: Any, consts: dict[str, np.ndarray]) -> tuple[int, int] | None:
    """(DequantizeLinear, QuantizeLinear) indices around the Gelu at nodes[i] when the three can run on uint8 codes:
    an exact Gelu of the standard or onnxruntime domain, per-tensor float32 scales, uint8 zero points, and no other
    reader of the float tensors in between."""
    gelu = nodes[i]
    if gelu.op_type != "Gelu" or gelu.domain not in ("", "com.microsoft"):
        return None
    if any(a.name == "approximate" and a.s != b"none" for a in gelu.attribute):
        return None
    readers = [k for k, node in enumerate(nodes) for name in node.input if name in (gelu.input[0], gelu.output[0])]
    outputs = {o.name for o in graph.output}
    d = next((k for k, node in enumerate(nodes) if gelu.input[0] in node.output), None)
    k = next((r for r in readers if nodes[r].input[0] == gelu.output[0]), None)
    if d is None or k is None or len(readers) != 2 or {gelu.input[0], gelu.output[0]} & outputs:
        return None
    dq, q = nodes[d], nodes[k]
    if dq.op_type != "DequantizeLinear" or q.op_type != "QuantizeLinear" or len(dq.input) < 3 or len(q.input) < 3:
        return None
    scales = [consts.get(dq.input[1]), consts.get(q.input[1])]
    zeros = [consts.get(dq.input[2]), consts.get(q.input[2])]
    if any(v is None or v.size != 1 or v.dtype != np.float32 for v in scales):
        return None
    if any(v is None or v.size != 1 or v.dtype != np.uint8 for v in zeros):
        return None
    return d, k


def gelu_in_int8(model: Any) -> int:
    """Rewrite DequantizeLinear -> Gelu -> QuantizeLinear (uint8 in, uint8 out, per-tensor; see `_gelu_chain`) as
    onnxruntime's QLinearSigmoid and QLinearMul (domain com.microsoft): y = x * sigmoid(1.702 x) computed from the
    uint8 codes through lookup tables, never in float; returns how many were rewritten.

    Error: the sigmoid form differs from GELU by at most 0.021 (near x = -2.3), and the sigmoid's own 8 bits add at
    most |x| / 510 (at most 0.007: the sigmoid's codes saturate beyond |x| ~ 3.7), so an output is off by at most
    0.028 / s_y + 1 levels of its scale s_y (1-2 levels for airbench's ranges; more for very narrow ones): the
    accuracy gate judges the whole model. On this 2-core CPU the rewritten GELU measured 3-4.5x faster than its
    float round trip on a (256, 32, 15, 15) tensor. The file then needs onnxruntime (contrib operators); exports
    for other runtimes skip this (`export --standard-onnx`)."""
    from onnx import helper, numpy_helper

    graph = model.graph
    nodes = list(graph.node)
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    taken = {name for node in nodes for name in (*node.input, *node.output)} | set(consts)
    dropped: set[int] = set()
    replaced: dict[int, list[Any]] = {}
    for i in range(len(nodes)):
        chain = _gelu_chain(nodes, i, graph, consts)
        if chain is None:
            continue
        (dq, q), gelu = (nodes[j] for j in chain), nodes[i]
        base = f"{gelu.name or gelu.output[0]}_int8"
        while any(name.startswith(base) for name in taken):
            base += "_"
        xscale, sscale, szero, sig = (f"{base}_{k}" for k in ("xscale", "sscale", "szero", "sigmoid"))
        slope = float(consts[dq.input[1]]) * GELU_SIGMOID_SLOPE
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(slope, np.float32), xscale),
                numpy_helper.from_array(np.array(1 / 255, np.float32), sscale),
                numpy_helper.from_array(np.array(0, np.uint8), szero),
            ]
        )
        taken |= {xscale, sscale, szero, sig}
        ms = "com.microsoft"
        replaced[i] = [
            helper.make_node("QLinearSigmoid", [dq.input[0], xscale, dq.input[2], sscale, szero], [sig], domain=ms),
            helper.make_node(
                "QLinearMul", [*dq.input[:3], sig, sscale, szero, *q.input[1:3]], [q.output[0]], domain=ms
            ),
        ]
        replaced[i][0].name, replaced[i][1].name = f"{base}_sigmoid", f"{base}_mul"
        dropped.update(chain)
    if replaced:
        if not any(o.domain == "com.microsoft" for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        gone = {nodes[i].output[0] for i in replaced} | {nodes[i].input[0] for i in replaced}  # Gelu's in and out
        kept_info = [v for v in graph.value_info if v.name not in gone]
        del graph.value_info[:]
        graph.value_info.extend(kept_info)
        del graph.node[:]
        graph.node.extend(n for i, node in enumerate(nodes) if i not in dropped for n in replaced.get(i, [node]))
    return len(replaced)


def input_convs(graph: Any) -> list[str]:
    """Names of the Conv nodes that read a graph input (the image itself). They stay float in the int8 model: with 3
    input channels they are cheap, while their int8 version needs a DequantizeLinear of their large output before
    the float activation; for airbench's whitening conv that made the layer 1.7x slower than in float."""
    inputs = {i.name for i in graph.input}
    return [node.name for node in graph.node if node.op_type == "Conv" and node.name and node.input[0] in inputs]


def quantize_onnx(
    float_path: Path,
    out: Path,
    images: Images,
    ckpt: dict[str, Any],
    quant_format: str = QUANT_FORMAT,
    gelu_lookups: bool = True,
) -> dict[str, Any]:
    """Static int8 quantization with onnxruntime: batch norms moved before max-pools (`bn_before_maxpool`), shape
    inference and graph optimizations (quant_pre_process), then per-channel int8 weights and uint8 activations whose
    ranges are the min/max seen on `images`. `quant_format`: 'QDQ' (QuantizeLinear/DequantizeLinear pairs around the
    float ops, fused by the runtime) or 'QOperator' (QLinearConv and friends in the file); the convs reading the image
    stay float (`input_convs`), and GELUs between int8 tensors run on their uint8 codes (`gelu_in_int8`; not with
    `gelu_lookups` False, which a benchmark uses to compare). Returns what was changed: batch norms moved, nodes kept
    float, GELUs rewritten.

    Weights use 7 of their 8 bits (reduce_range): on x86 CPUs without VNNI, onnxruntime multiplies uint8 by int8 with
    an instruction that adds pairs of products into 16 bits, which overflows for full-range weights; airbench's
    whitening conv (large weights of both signs) then cost the quick model 40-60 points of accuracy."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    formats = {"QDQ": QuantFormat.QDQ, "QOperator": QuantFormat.QOperator}
    check_choice(quant_format, tuple(formats), "quant_format")
    model = onnx.load(str(float_path))
    moved = bn_before_maxpool(model.graph)
    prepared = out.with_name(f"{out.stem}.prepared.onnx")
    quiet = logging.getLogger()  # the quantizer logs advice through the root logger
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
            warnings.simplefilter("ignore")
            quant_pre_process(model, str(prepared))
            kept_float = input_convs(onnx.load(str(prepared)).graph)
            quantize_static(
                str(prepared),
                str(out),
                _calibration_reader(images, ckpt),
                quant_format=formats[quant_format],
                per_channel=True,
                reduce_range=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=kept_float,
                calibrate_method=CalibrationMethod.MinMax,
            )
    finally:
        quiet.setLevel(level)
        prepared.unlink(missing_ok=True)
    quantized = onnx.load(str(out))
    gelus = gelu_in_int8(quantized) if gelu_lookups else 0
    if gelus:
        onnx.save(quantized, str(out))
    return {"batch_norms_moved_before_max_pools": moved, "float_nodes": kept_float, "gelus_in_int8": gelus}


def gate_sample(num_test: int, count: int) -> np.ndarray:
    """Indices of the `count` test images the int8 gate scores: drawn with a fixed seed from the whole split and kept
    in order, so every class takes part (a split stored class by class would give the first ones only). A smaller
    sample is part of a larger one: the first `count` of one fixed permutation."""
    count = min(count, num_test)
    return np.sort(np.random.default_rng(GATE_SEED).permutation(num_test)[:count])


def onnx_accuracy(
    paths: list[Path],
    images: Images,
    labels: np.ndarray,
    ckpt: dict[str, Any],
    threads: int | None = None,
    indices: np.ndarray | None = None,
) -> list[int]:
    """How many of the images at `indices` (default: all) each ONNX model labels right (top-1), the models run side
    by side on the same batches."""
    sessions = [onnx_session(p, threads) for p in paths]
    indices = np.arange(len(labels)) if indices is None else np.asarray(indices)
    right = [0] * len(paths)
    for i in range(0, len(indices), 250):
        chunk = indices[i : i + 250]
        x = model_inputs(np.asarray(images[chunk]), ckpt).numpy()
        for k, session in enumerate(sessions):
            right[k] += int((session.run(None, {INPUT_NAME: x})[0].argmax(1) == labels[chunk]).sum())
    return right


def export_int8(
    float_path: Path,
    out: Path,
    ckpt: dict[str, Any],
    ds: Dataset,
    metadata: dict[str, Any],
    *,
    calibration_count: int,
    gate_images: int,
    max_accuracy_drop: float,
    quant_format: str = QUANT_FORMAT,
    gelu_lookups: bool = True,
    threads: int | None = None,
    data: str = "",
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Quantize the float ONNX model at `float_path` (see `quantize_onnx`), compare both models' top-1 accuracy on
    `gate_images` test images spread over the split (`gate_sample`) and write the int8 model to `out` only when it
    loses at most `max_accuracy_drop` points (else raise AccuracyGateFailed and leave `out` as it was). Returns the
    record of what was done."""
    calib = calibration_images(ds, ckpt, calibration_count)
    quantized = float_path.with_name("int8.onnx")
    log(f"quantizing to int8 ({quant_format}, per-channel weights) with {len(calib)} training images of {data}")
    try:
        changes = quantize_onnx(float_path, quantized, calib, ckpt, quant_format, gelu_lookups)
    except CifarCnnError:
        raise
    except Exception as exc:  # the quantizer's errors name an operator or a tensor; keep the first line
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CifarCnnError(f"int8 quantization of {float_path.name} failed: {first}") from None
    pick = gate_sample(len(ds.test_labels), gate_images)
    n = len(pick)
    if n == 0:
        raise CifarCnnError(f"--data {data}: no test images to check the int8 model's accuracy on")
    right_float, right_int8 = onnx_accuracy(
        [float_path, quantized], ds.test_images, ds.test_labels, ckpt, threads, indices=pick
    )
    drop = 100.0 * (right_float - right_int8) / n
    passed = drop <= max_accuracy_drop
    record = {
        "method": f"onnxruntime static quantization, {quant_format}"
        + (
            f"; {changes['gelus_in_int8']} GELUs on int8 codes (onnxruntime contrib operators)"
            if changes["gelus_in_int8"]
            else ""
        ),
        "weights": "int8 in 7 bits (reduce_range)",
        "activations": "uint8",
        "per_channel": True,
        **changes,
        "calibration": {"method": "MinMax", "images": len(calib), "split": "train", "seed": CALIBRATION_SEED},
        "gate": {
            "num_images": n,
            "float_accuracy": right_float / n,
            "int8_accuracy": right_int8 / n,
            "drop_points": drop,
            "max_accuracy_drop": max_accuracy_drop,
            "passed": passed,
            "sample": {"seed": GATE_SEED, "spread_over_the_split": True},
        },
    }
    verdict = "within" if passed else "beyond"
    log(
        f"top-1 accuracy on {n} test images of {data}: float {100 * right_float / n:.2f}%, int8 "
        f"{100 * right_int8 / n:.2f}% (a drop of {drop:.2f} points, {verdict} --max-accuracy-drop "
        f"{max_accuracy_drop:g})"
    )
    if not passed:
        raise AccuracyGateFailed(
            f"int8 model refused: top-1 {100 * right_int8 / n:.2f}% against {100 * right_float / n:.2f}% for the float "
            f"model on {n} test images is a drop of {drop:.2f} points, more than --max-accuracy-drop "
            f"{max_accuracy_drop:g}; nothing written to {out} (export without --int8, or allow a larger drop)"
        )
    import onnx

    write_onnx(onnx.load(str(quantized)), out, {**metadata, "quantization": record})
    return record


def _export_model(model: nn.Module, fmt: str, out: Path, metadata: dict[str, Any], checkpoint: Path) -> None:
    """Write `model` as `fmt` to `out`; an exporter's own failure becomes a one-line CifarCnnError."""
    size = int(metadata["input_size"])
    exporter = export_onnx if fmt == "onnx" else export_torchscript
    try:
        exporter(model, torch.zeros(2, 3, size, size), out, metadata)
    except CifarCnnError:
        raise
    except Exception as exc:  # an exporter failure names an operator or a shape; keep its first line
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CifarCnnError(f"{fmt} export of {checkpoint} failed: {first}") from None


def _check_int8_options(fmt: str, gate_images: int, calibration_count: int, max_accuracy_drop: float) -> None:
    if fmt != "onnx":
        raise CifarCnnError(f"--int8 quantizes ONNX models only; use --format onnx instead of --format {fmt}")
    if gate_images < 1:
        raise CifarCnnError(f"--gate-images must be at least 1, got {gate_images}")
    if calibration_count < 1:
        raise CifarCnnError(f"--quantization-images must be at least 1, got {calibration_count}")
    if not math.isfinite(max_accuracy_drop):
        raise CifarCnnError(f"--max-accuracy-drop must be a finite number of points, got {max_accuracy_drop}")


def export_checkpoint(
    checkpoint: str | Path,
    fmt: str,
    out: str | Path,
    *,
    data: str | None = None,
    num_images: int = 1000,
    tolerance: float = EXPORT_TOLERANCE,
    int8: bool = False,
    gate_images: int = 2000,
    calibration_count: int = 512,
    max_accuracy_drop: float = 0.5,
    quant_format: str = QUANT_FORMAT,
    gelu_lookups: bool = True,
    threads: int | None = None,
    home: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Export `checkpoint` to `out` as 'onnx' or 'torchscript', check parity on `num_images` test images of `data`
    (default: the data it was trained on, from run.json) and write OUT.json. Returns the OUT.json content; its
    'parity_ok' says whether the difference is within `tolerance` and every top-1 label agrees.

    With `int8` (ONNX only) the float model is exported to a temporary folder beside `out`, checked for parity there,
    then quantized with `calibration_count` training images and gated on `gate_images` test images (see
    `export_int8`); OUT.json gains a 'quantization' record."""
    check_choice(fmt, EXPORT_FORMATS, "--format")
    if num_images < 1:
        raise CifarCnnError(f"--num-images must be at least 1, got {num_images}")
    if int8:
        _check_int8_options(fmt, gate_images, calibration_count, max_accuracy_drop)
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
    log(f"exporting {checkpoint} ({ckpt['model']['name']}) to {fmt}{' int8' if int8 else ''}: {out}")
    # int8: the float model lives in a temporary folder beside `out` (removed at the end, whatever happens)
    work = tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) if int8 else contextlib.nullcontext()
    with work as folder:
        target = Path(folder) / "float.onnx" if int8 else out
        _export_model(model, fmt, target, metadata, checkpoint)
        check = parity(model, ckpt, fmt, target, images)
        check.update(data=str(data), tolerance=tolerance)
        ok = check["max_abs_logit_diff"] <= tolerance and check["top1_agreement"] == 1.0
        if int8 and not ok:
            raise AccuracyGateFailed(
                f"the float model differs from PyTorch (max abs logit difference {check['max_abs_logit_diff']:.2e}, "
                f"top-1 agreement {100 * check['top1_agreement']:.2f}%, tolerance {tolerance:g}), so it was not "
                f"quantized and nothing was written at {out}"
            )
        if int8:
            check["model"] = "the float model before quantization"
            quantization = export_int8(
                target,
                out,
                ckpt,
                ds,
                metadata,
                calibration_count=calibration_count,
                gate_images=gate_images,
                max_accuracy_drop=max_accuracy_drop,
                quant_format=quant_format,
                gelu_lookups=gelu_lookups,
                threads=threads,
                data=data,
                log=log,
            )
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
    if int8:
        report["quantization"] = quantization
    if ds.skipped:
        report["skipped_images"] = len(ds.skipped)  # label rows left out with --skip-bad
    atomic_write_text(Path(f"{out}.json"), json.dumps(report, indent=2) + "\n")
    log(
        f"parity{' of the float model' if int8 else ''} on {check['num_images']} test images of {data}: max abs logit "
        f"difference {check['max_abs_logit_diff']:.2e}, top-1 agreement {100 * check['top1_agreement']:.2f}% "
        f"({'ok' if ok else 'NOT within tolerance ' + format(tolerance, 'g')}); wrote {out} and {out}.json"
    )
    log(metadata["note"])
    return report
