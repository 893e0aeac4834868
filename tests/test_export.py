"""Export: ONNX and TorchScript files that agree with PyTorch on real CIFAR-10 test images, dynamic batch size,
the FILE.json description, and ONNX prediction in a process where torch cannot be imported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar_cnn import load_checkpoint, model_from_checkpoint
from cifar_cnn.cli import main
from cifar_cnn.data import load_dataset
from cifar_cnn.export import export_checkpoint
from cifar_cnn.predict import Predictor

from .conftest import CLASSES, ROOT, run_cli
from .model_fixtures import checkpoint_data, real_test_tree, tiny_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="session")
def real_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """1,000 real CIFAR-10 test JPEGs (100 per class) from the shared archive."""
    return real_test_tree(tmp_path_factory, per_class=100)


@pytest.fixture(scope="session")
def exported(checkpoint: Path, real_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Both formats exported once, each checked by the exporter on the 1,000 real test images."""
    out = tmp_path_factory.mktemp("exported")
    reports = {}
    for fmt, name in (("onnx", "model.onnx"), ("torchscript", "model.ts")):
        report = export_checkpoint(
            checkpoint, fmt, out / name, data=str(real_data), home=out / "home", threads=1, log=lambda m: None
        )
        reports[fmt] = {"path": out / name, "report": report}
    return reports


def _normalized(images: np.ndarray, ckpt: dict) -> np.ndarray:
    """x / 255, (x - mean) / std, computed here in float64 and rounded once to float32."""
    x = images.astype(np.float64) / 255.0
    x = (x - np.array(ckpt["mean"]).reshape(1, 3, 1, 1)) / np.array(ckpt["std"]).reshape(1, 3, 1, 1)
    return x.astype(np.float32)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_model_matches_pytorch_on_1000_real_test_images(
    fmt: str, exported: dict, checkpoint: Path, real_data: Path, tmp_path: Path
):
    path, report = exported[fmt]["path"], exported[fmt]["report"]
    parity = report["parity"]
    assert parity["num_images"] == 1000 and parity["data"] == str(real_data)
    assert parity["max_abs_logit_diff"] <= 1e-4 and parity["top1_agreement"] == 1.0 and report["parity_ok"]

    # The same claim checked independently: the file in its own runtime against the PyTorch module.
    ckpt = load_checkpoint(checkpoint)
    images = load_dataset(str(real_data), 32, home=tmp_path / "home", log=lambda m: None).test_images
    assert images.shape == (1000, 3, 32, 32)
    x = _normalized(images, ckpt)
    with torch.no_grad():
        reference = model_from_checkpoint(ckpt)(torch.from_numpy(x)).numpy()
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].shape[0] == "batch"  # a symbolic, dynamic batch dimension
        got = np.concatenate([session.run(None, {"images": x[i : i + 333]})[0] for i in range(0, 1000, 333)])
        one = session.run(None, {"images": x[:1]})[0]
    else:
        loaded = torch.jit.load(str(path))
        with torch.no_grad():
            got = np.concatenate([loaded(torch.from_numpy(x[i : i + 333])).numpy() for i in range(0, 1000, 333)])
            one = loaded(torch.from_numpy(x[:1])).numpy()
    assert got.shape == (1000, 10) and one.shape == (1, 10)
    assert np.abs(got - reference).max() <= 1e-4 and np.abs(one - reference[:1]).max() <= 1e-4
    assert (got.argmax(1) == reference.argmax(1)).all()
    assert len(set(reference.argmax(1).tolist())) > 1  # the comparison covers more than one predicted class

    sidecar = json.loads(Path(f"{path}.json").read_text())
    assert sidecar == json.loads(json.dumps(report))
    assert sidecar["classes"] == CLASSES and sidecar["mean"] == [0.5] * 3 and sidecar["std"] == [0.5] * 3
    assert (
        sidecar["input_size"] == 32 and sidecar["tta"] == "none" and "without test-time augmentation" in sidecar["note"]
    )


def test_onnx_predict_runs_where_torch_cannot_be_imported(exported: dict, checkpoint: Path, real_data: Path):
    onnx_file = exported["onnx"]["path"]
    folder = real_data / "test" / "cat"
    argv = ["cifar-cnn", "predict", "--onnx", str(onnx_file), str(folder), "--json", "--top-k", "3"]
    code = (
        "import sys, runpy; sys.modules['torch'] = None\n"  # `import torch` now raises ImportError
        f"sys.argv = {argv!r}\n"
        "try:\n    runpy.run_module('cifar_cnn', run_name='__main__')\n"
        "finally:\n    assert sys.modules['torch'] is None and not any(m.startswith('torch.') for m in sys.modules)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["errors"] == [] and len(got["predictions"]) == 100
    want = Predictor.from_checkpoint(checkpoint, tta="none").predict_files([folder], top_k=3)
    for g, w in zip(got["predictions"], want.predictions):
        assert g["path"] == w["path"] and [t["label"] for t in g["top_k"]] == [t["label"] for t in w["top_k"]]
        assert np.allclose([t["probability"] for t in g["top_k"]], [t["probability"] for t in w["top_k"]], atol=1e-5)


def test_cli_export_defaults_to_the_training_data_and_prints_one_json_object(
    checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path
):
    out = tmp_path / "m.ts"
    r = run_cli("export", str(checkpoint), "--format", "torchscript", "--out", str(out), "--json", "--threads", "1")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)  # the whole of stdout is one JSON object
    data = checkpoint_data(tmp_path_factory)
    assert result["parity"]["data"] == str(data) and result["parity"]["num_images"] == 200  # the tiny test split
    assert result["parity"]["max_abs_logit_diff"] <= 1e-4 and result["parity"]["top1_agreement"] == 1.0
    assert "top-1 agreement 100.00%" in r.stderr and out.is_file() and Path(f"{out}.json").is_file()


def test_cli_export_without_known_data_asks_for_data(checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    """A checkpoint records its data source, so a copy away from its run exports on that data; one that records none
    (an older checkpoint) and has no run.json beside it asks for --data."""
    lone = tmp_path / "lone.pt"
    shutil.copy(checkpoint, lone)  # no run.json beside it, but the record inside
    assert main(["export", str(lone), "--format", "onnx", "--out", str(tmp_path / "a.onnx"), "--num-images", "20"]) == 0
    recorded = load_checkpoint(checkpoint)["data_source"]["path"]
    assert json.loads((tmp_path / "a.onnx.json").read_text())["parity"]["data"] == recorded
    ckpt = torch.load(checkpoint, weights_only=True)
    del ckpt["data_source"]
    torch.save(ckpt, lone)
    capsys.readouterr()
    assert main(["export", str(lone), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "give --data SOURCE" in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
