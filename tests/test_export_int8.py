"""int8 ONNX export (static quantization by onnxruntime, gated on test accuracy) and the softmax temperature carried
by exported models: real trained models exported and run, checked against PyTorch and the float export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from cifar_cnn import load_checkpoint, model_from_checkpoint
from cifar_cnn.cli import main
from cifar_cnn.data import load_dataset
from cifar_cnn.export import (
    AccuracyGateFailed,
    bn_before_maxpool,
    export_checkpoint,
    gate_sample,
    gelu_in_int8,
    model_inputs,
)
from cifar_cnn.onnx_predict import METADATA_KEY, OnnxPredictor

from .model_fixtures import checkpoint_data, tiny_checkpoint

SAME_AS_FLOAT = ("format", "model", "classes", "mean", "std", "input_size", "input", "output", "tta", "temperature")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def test_split(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, np.ndarray]:
    """The 200 test images and labels of the data the tiny checkpoint was trained on."""
    ds = load_dataset(
        str(checkpoint_data(tmp_path_factory)), 32, home=tmp_path_factory.mktemp("home"), log=lambda m: None
    )
    return np.asarray(ds.test_images), ds.test_labels


@pytest.fixture(scope="module")
def exports(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny checkpoint exported once as float ONNX and once as int8 with the default gate."""
    out = tmp_path_factory.mktemp("int8-export")
    lines: list[str] = []
    common = dict(num_images=50, threads=1, home=out / "home")
    float_report = export_checkpoint(checkpoint, "onnx", out / "float.onnx", log=lambda m: None, **common)
    int8_report = export_checkpoint(checkpoint, "onnx", out / "int8.onnx", int8=True, log=lines.append, **common)
    return {
        "float": (out / "float.onnx", float_report),
        "int8": (out / "int8.onnx", int8_report),
        "log": lines,
    }


def _file_metadata(path: Path) -> dict:
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    return json.loads(props[METADATA_KEY])


def _listing(folder: Path) -> list[str]:
    """What is in `folder`, hidden files included, less the data home the tests' autouse fixture puts there."""
    return sorted(p.name for p in folder.iterdir() if p.name != "home")


def test_int8_export_passes_the_default_gate_and_predicts_like_the_float_model(
    exports: dict, checkpoint: Path, test_split: tuple[np.ndarray, np.ndarray], tmp_path: Path
):
    path, report = exports["int8"]
    gate = report["quantization"]["gate"]
    images, labels = test_split
    assert gate["passed"] and gate["num_images"] == 200 == len(labels) and gate["max_accuracy_drop"] == 0.5
    assert report["quantization"]["per_channel"] and report["quantization"]["calibration"]["split"] == "train"
    assert report["quantization"]["calibration"]["images"] == 480  # all of the run's training split (600 less 20%)

    # The gate's float accuracy, recomputed with the PyTorch module (the float ONNX model agrees with it on top-1).
    ckpt = load_checkpoint(checkpoint)
    x = (images.astype(np.float32) / 255 - 0.5) / 0.5
    with torch.no_grad():
        torch_logits = model_from_checkpoint(ckpt)(torch.from_numpy(x)).numpy()
    assert gate["float_accuracy"] == pytest.approx(float((torch_logits.argmax(1) == labels).mean()))
    assert gate["float_accuracy"] > 0.5  # a model that learned something, so the comparison means something
    assert gate["float_accuracy"] - gate["int8_accuracy"] <= 0.005
    printed = [line for line in exports["log"] if line.startswith("top-1 accuracy on 200 test images")]
    assert len(printed) == 1 and f"float {100 * gate['float_accuracy']:.2f}%" in printed[0]
    assert f"int8 {100 * gate['int8_accuracy']:.2f}%" in printed[0]

    # Really quantized: the weights are stored as int8, but for the first conv's (it reads the image: kept float).
    model = onnx.load(str(path))
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) >= 2]
    float_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 2]
    assert len(int8_weights) == 3 and [tuple(t.dims) for t in float_weights] == [
        tuple(ckpt["model_state"]["conv1.weight"].shape)
    ]
    assert len(report["quantization"]["float_nodes"]) == 1

    # predict --onnx runs it: the same labels as the float export on most images, similar probabilities.
    quantized, floating = OnnxPredictor(path, threads=1), OnnxPredictor(exports["float"][0], threads=1)
    got, want = quantized.predict(images, top_k=1), floating.predict(images, top_k=1)
    agree = np.mean([g["label"] == w["label"] for g, w in zip(got, want)])
    assert agree >= 0.95
    assert np.mean([abs(g["probability"] - w["probability"]) for g, w in zip(got, want)]) < 0.05


def test_predict_onnx_command_runs_the_int8_model(
    exports: dict, test_split: tuple[np.ndarray, np.ndarray], tmp_path: Path, capsys: pytest.CaptureFixture
):
    from PIL import Image

    images = test_split[0][:20]
    for i, image in enumerate(images):
        Image.fromarray(image.transpose(1, 2, 0)).save(tmp_path / f"{i:02d}.png")  # lossless: the same pixels
    capsys.readouterr()
    assert main(["predict", "--onnx", str(exports["int8"][0]), str(tmp_path), "--json", "--top-k", "3"]) == 0
    got = json.loads(capsys.readouterr().out)["predictions"]
    want = OnnxPredictor(exports["int8"][0]).predict(images, top_k=3)
    assert [Path(g["path"]).name for g in got] == [f"{i:02d}.png" for i in range(20)]
    for g, w in zip(got, want):
        assert [t["label"] for t in g["top_k"]] == [t["label"] for t in w["top_k"]]
        assert np.allclose([t["probability"] for t in g["top_k"]], [t["probability"] for t in w["top_k"]])


def test_int8_file_and_sidecar_carry_the_float_exports_metadata(exports: dict, tmp_path: Path):
    (path, report), (float_path, float_report) = exports["int8"], exports["float"]
    in_file, float_in_file = _file_metadata(path), _file_metadata(float_path)
    sidecar = json.loads(Path(f"{path}.json").read_text())
    assert sidecar == json.loads(json.dumps(report))
    for key in SAME_AS_FLOAT:
        assert in_file[key] == float_in_file[key] == sidecar[key] == float_report[key], key
    assert in_file["quantization"] == sidecar["quantization"] and "quantization" not in float_in_file
    assert sidecar["parity_ok"] and sidecar["parity"]["model"] == "the float model before quantization"

    # Same graph input and output as the float model, and usable without the sidecar.
    lone = tmp_path / "lone.onnx"
    shutil.copy(path, lone)
    predictor = OnnxPredictor(lone)
    inputs, outputs = predictor.session.get_inputs(), predictor.session.get_outputs()
    assert [i.name for i in inputs] == ["images"] and inputs[0].type == "tensor(float)"
    assert inputs[0].shape[0] == "batch"  # dynamic batch size, as in the float export
    assert [o.name for o in outputs] == ["logits"] and outputs[0].type == "tensor(float)"
    assert predictor.classes == sidecar["classes"] and predictor.describe()["temperature"] == 1.0


def test_int8_gate_refusal_exits_1_and_leaves_out_as_it_was(
    checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    out = tmp_path / "model.onnx"
    out.write_bytes(b"an earlier model")
    argv = ["export", str(checkpoint), "--format", "onnx", "--int8", "--out", str(out), "--num-images", "20"]
    capsys.readouterr()
    # 150 gate images: fewer than the test split holds, and not a whole number of scoring batches
    assert main([*argv, "--threads", "1", "--max-accuracy-drop", "-100", "--gate-images", "150"]) == 1
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "int8 model refused" in err[0] and "--max-accuracy-drop -100" in err[0]
    assert "top-1 accuracy on 150 test images" in captured.out and "float" in captured.out and "int8" in captured.out
    assert out.read_bytes() == b"an earlier model"
    assert _listing(tmp_path) == ["model.onnx"]  # no OUT.json, no temporary files

    out.unlink()  # and with nothing there before: nothing there after (the library raises, exit code 1)
    with pytest.raises(AccuracyGateFailed) as refused:
        export_checkpoint(
            checkpoint, "onnx", out, int8=True, num_images=20, max_accuracy_drop=-100, threads=1, log=lambda m: None
        )
    assert refused.value.exit_code == 1
    assert _listing(tmp_path) == []


def test_int8_with_torchscript_is_refused_in_one_line(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "m.ts"
    assert main(["export", str(checkpoint), "--format", "torchscript", "--int8", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--int8" in err[0] and "--format onnx" in err[0]
    assert not out.exists()


def test_temperature_travels_in_the_export_and_predict_applies_it(
    exports: dict, checkpoint: Path, test_split: tuple[np.ndarray, np.ndarray], tmp_path: Path
):
    ckpt = torch.load(checkpoint, weights_only=True)
    ckpt["temperature"] = 2.0
    hot = tmp_path / "hot.pt"
    torch.save(ckpt, hot)  # away from its run: the data source recorded in it is used
    out = tmp_path / "hot.onnx"
    report = export_checkpoint(hot, "onnx", out, num_images=20, threads=1, log=lambda m: None)
    assert report["temperature"] == 2.0 and _file_metadata(out)["temperature"] == 2.0
    assert exports["float"][1]["temperature"] == 1.0

    images = test_split[0][:40]
    x = (images.astype(np.float64) / 255 - 0.5) / 0.5
    with torch.no_grad():
        logits = model_from_checkpoint(ckpt)(torch.from_numpy(x.astype(np.float32))).double()
    want = torch.softmax(logits / 2.0, 1).numpy()  # the probabilities at T = 2, computed here
    hot_predictor = OnnxPredictor(out)
    assert hot_predictor.temperature == 2.0 and hot_predictor.describe()["temperature"] == 2.0
    got = hot_predictor.predict(images, top_k=10)
    cold = OnnxPredictor(exports["float"][0]).predict(images, top_k=10)
    classes = hot_predictor.classes
    for row, p, c in zip(got, want, cold):
        by_label = {t["label"]: t["probability"] for t in row["top_k"]}
        assert np.allclose([by_label[name] for name in classes], p, atol=1e-5)
        assert row["label"] == c["label"]  # a temperature changes no prediction ...
    assert max(abs(g["probability"] - c["probability"]) for g, c in zip(got, cold)) > 0.05  # ... only how sure


def _pool_bn_graph() -> onnx.ModelProto:
    """conv -> max-pool -> BN (positive scale) -> relu -> max-pool -> BN (one channel's scale negative), by hand."""
    rng = np.random.default_rng(0)
    consts = {"w": rng.normal(size=(4, 3, 3, 3)), "one": np.ones(4), "bias": rng.normal(size=4)}
    consts.update(mean=rng.normal(size=4), var=rng.uniform(0.5, 2, size=4), flipped=np.array([1.0, -0.5, 2.0, 1.0]))
    pool = dict(kernel_shape=[2, 2], strides=[2, 2])
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("MaxPool", ["c"], ["p1"], **pool),
        helper.make_node("BatchNormalization", ["p1", "one", "bias", "mean", "var"], ["b1"], epsilon=1e-5),
        helper.make_node("Relu", ["b1"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p2"], **pool),
        helper.make_node("BatchNormalization", ["p2", "flipped", "bias", "mean", "var"], ["y"], epsilon=1e-5),
    ]
    graph = helper.make_graph(
        nodes,
        "pool-bn",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 4, 2, 2])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in consts.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_batch_norms_move_before_max_pools_only_where_that_changes_nothing():
    model = _pool_bn_graph()
    x = np.random.default_rng(1).normal(size=(5, 3, 8, 8)).astype(np.float32)
    before = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert bn_before_maxpool(model.graph) == 1  # the second has a negative scale in one channel: max and BN differ
    onnx.checker.check_model(model, full_check=True)  # still topologically sorted, shapes consistent
    assert [n.op_type for n in model.graph.node] == [
        "Conv", "BatchNormalization", "MaxPool", "Relu", "MaxPool", "BatchNormalization"
    ]  # fmt: skip
    after = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    assert np.allclose(after, before, atol=1e-5)


def test_gate_sample_is_fixed_and_spread_over_a_split_stored_by_class():
    labels = np.repeat(np.arange(10), 1000)  # CIFAR-10's test split as an image folder stores it: class by class
    pick = gate_sample(len(labels), 2000)
    assert np.array_equal(pick, gate_sample(len(labels), 2000)) and len(np.unique(pick)) == 2000
    assert np.all(np.diff(pick) > 0)
    counts = np.bincount(labels[pick], minlength=10)
    assert counts.min() >= 150 and counts.max() <= 250  # every class, about 200 each (the first 2,000: 2 classes)
    assert np.array_equal(gate_sample(200, 2000), np.arange(200))  # fewer images than asked: all of them
    assert set(gate_sample(len(labels), 500)) <= set(pick)  # a smaller gate scores a part of a larger one


def _gelu_graph(
    approximate: str = "none",
    float_out: bool = False,
    y_scale: float = 0.03,
    per_channel: bool = False,
    int8_zero: bool = False,
    two_readers: bool = False,
) -> onnx.ModelProto:
    """uint8 x -> DequantizeLinear -> Gelu -> QuantizeLinear -> uint8 y, as the quantizer leaves a GELU between two
    int8 convolutions; the options make the variants the rewrite must leave alone (the float tensor also an output, a
    per-channel scale, int8 zero points, a second reader of the GELU's output)."""
    shape = [2, 8, 15, 15]
    x_scale = np.full(8, 0.05, np.float32) if per_channel else np.array(0.05, np.float32)
    zero = np.array(0 if int8_zero else 128, np.int8 if int8_zero else np.uint8)
    consts = [
        numpy_helper.from_array(x_scale, "sx"),
        numpy_helper.from_array(zero, "zx"),
        numpy_helper.from_array(np.array(y_scale, np.float32), "sy"),
        numpy_helper.from_array(np.array(6, zero.dtype), "zy"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["x", "sx", "zx"], ["f"], name="dq", axis=1),
        helper.make_node("Gelu", ["f"], ["g"], name="gelu", approximate=approximate),
        helper.make_node("QuantizeLinear", ["g", "sy", "zy"], ["y"], name="q"),
    ]
    code = onnx.TensorProto.INT8 if int8_zero else onnx.TensorProto.UINT8
    outputs = [helper.make_tensor_value_info("y", code, shape)]
    if float_out:
        outputs.append(helper.make_tensor_value_info("f", onnx.TensorProto.FLOAT, shape))
    if two_readers:
        nodes.append(helper.make_node("QuantizeLinear", ["g", "sy", "zy"], ["y2"], name="q2"))
        outputs.append(helper.make_tensor_value_info("y2", code, shape))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", code, shape)], outputs, consts)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def _exact_gelu_codes(codes: np.ndarray, x_scale: float, y_scale: float) -> np.ndarray:
    """The reference: exact (erf) GELU of the dequantized codes, quantized to the output's scale (zero point 6)."""
    from math import erf, sqrt

    real = (np.arange(256) - 128) * x_scale
    table = np.clip(np.round(np.array([v * 0.5 * (1 + erf(v / sqrt(2))) for v in real]) / y_scale) + 6, 0, 255)
    return table[codes]


@pytest.mark.parametrize("y_scale", [0.03, 0.0062])
def test_gelu_between_int8_tensors_runs_on_its_uint8_codes(y_scale: float):
    x = np.arange(2 * 8 * 15 * 15, dtype=np.int64).reshape(2, 8, 15, 15) % 256  # every code, many times
    model = _gelu_graph(y_scale=y_scale)
    assert gelu_in_int8(model) == 1
    onnx.checker.check_model(model)  # a valid model: the contrib domain is imported
    assert [n.op_type for n in model.graph.node] == ["QLinearSigmoid", "QLinearMul"]
    got = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x.astype(np.uint8)})[0]
    # Within the stated bound of the exact GELU: 0.028 / s_y + 1 levels (2 at s_y 0.03; 5 at a narrow 0.0062)
    diff = np.abs(got.astype(int) - _exact_gelu_codes(x, 0.05, y_scale))
    assert diff.max() <= int(0.028 / y_scale) + 1 and diff.mean() < 0.6 and (got > 20).any()


@pytest.mark.parametrize(
    "variant",
    [
        {"approximate": "tanh"},
        {"float_out": True},
        {"per_channel": True},
        {"int8_zero": True},
        {"two_readers": True},
    ],
)
def test_gelu_left_alone_when_it_cannot_run_on_uint8_codes(variant: dict):
    model = _gelu_graph(**variant)
    before = [n.op_type for n in model.graph.node]
    assert gelu_in_int8(model) == 0
    assert [n.op_type for n in model.graph.node] == before and "Gelu" in before


def test_an_airbench_export_runs_its_gelus_in_int8(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, checkpoint: Path
):
    """A small airbench net (GELUs after every conv) trained briefly on the tiny data, exported int8 with and without
    the rewrite: the GELUs between int8 tensors are gone, and the two int8 models agree."""
    from cifar_cnn import resolve_config, train

    data = checkpoint_data(tmp_path_factory)  # the tiny checkpoint's generated data
    overrides = dict(
        epochs=2, batch_size=50, device="cpu", precision="fp32", model_args={"widths": [8, 16, 16], "depth": 1}
    )
    train(
        resolve_config("quick", None, overrides),
        str(data),
        tmp_path / "run",
        home=tmp_path / "home",
        log=lambda m: None,
        threads=1,
    )
    best = tmp_path / "run" / "best.pt"
    flags = ["--num-images", "20", "--max-accuracy-drop", "100", "--quantization-images", "64", "--threads", "1"]
    for name, extra in ((True, []), (False, ["--standard-onnx"])):  # the command line, as a user would
        argv = ["export", str(best), "--format", "onnx", "--int8", "--out", str(tmp_path / f"int8-{name}.onnx")]
        assert main([*argv, "--data", str(data), *flags, *extra]) == 0
    reports = {k: json.loads((tmp_path / f"int8-{k}.onnx.json").read_text()) for k in (True, False)}
    rewritten = reports[True]["quantization"]["gelus_in_int8"]
    assert rewritten >= 2 and reports[False]["quantization"]["gelus_in_int8"] == 0
    ops = {k: [n.op_type for n in onnx.load(str(tmp_path / f"int8-{k}.onnx")).graph.node] for k in (True, False)}
    assert ops[False].count("Gelu") == ops[True].count("Gelu") + rewritten and "QLinearSigmoid" not in ops[False]
    assert ops[True].count("QLinearSigmoid") == ops[True].count("QLinearMul") == rewritten
    ds = load_dataset(str(data), 32, home=tmp_path / "home", log=lambda m: None)
    x = model_inputs(np.asarray(ds.test_images), reports[False]).numpy()
    logits = {
        k: ort.InferenceSession(str(tmp_path / f"int8-{k}.onnx")).run(None, {"images": x})[0] for k in (True, False)
    }
    scale = np.abs(logits[False]).max()
    assert np.abs(logits[True] - logits[False]).max() < 0.1 * scale
    assert (logits[True].argmax(1) == logits[False].argmax(1)).mean() >= 0.95
