"""The tutorial notebook (examples/cifar10_tutorial.ipynb): stored without outputs, and it runs top to bottom.

The run executes every cell in a real Jupyter kernel (nbclient, ipykernel) on the real CIFAR-10 JPEG archive, with
the notebook's small settings (CIFAR_CNN_TUTORIAL_SMALL=1: 2,000 training images, 2 seed epochs, 1 quick epoch),
then checks what the cells printed against the files the run wrote.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from .conftest import ROOT

NOTEBOOK = ROOT / "examples" / "cifar10_tutorial.ipynb"


def read_notebook() -> nbformat.NotebookNode:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    return nb


def test_notebook_is_stored_without_outputs() -> None:
    nb = read_notebook()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, "the notebook has no code cells"
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"cells {dirty} hold outputs or execution counts; clear them before committing"
    assert "parameters" in code[0].metadata.get("tags", []), "the first code cell is the (papermill) parameter cell"
    assert nb.metadata["kernelspec"]["name"] == "python3"
    # readable as a document: explanations between the steps, not a wall of code
    markdown = [c for c in nb.cells if c.cell_type == "markdown"]
    assert len(markdown) >= 12
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")


def stream_text(nb: nbformat.NotebookNode) -> str:
    return "".join(
        o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "stream"
    )


def test_notebook_runs_top_to_bottom(tmp_path: Path, shared_archive: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "runs"
    # the kernel inherits this environment ($CIFAR_CNN_HOME is the test's own, empty: the archive is decoded afresh)
    monkeypatch.setenv("CIFAR_CNN_TUTORIAL_SMALL", "1")
    monkeypatch.setenv("CIFAR_CNN_TUTORIAL_DATA", str(shared_archive))
    monkeypatch.setenv("CIFAR_CNN_TUTORIAL_OUT", str(out))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))

    nb = read_notebook()
    # raises CellExecutionError, naming the cell and its traceback, if any cell fails
    cwd = {"metadata": {"path": str(NOTEBOOK.parent)}}  # where Jupyter would start it: examples/
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources=cwd)
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
    assert not errors
    text = stream_text(nb)

    # this checkout's package, even beside another installed copy
    assert f"from {ROOT / 'src' / 'cifar_cnn'}" in text

    # the data and the split: 2,000 images, 20% held out per class
    assert "1600 training, 400 validation, 10000 test images" in text
    assert "values from -1.000 to 1.000" in text

    # the seed network was printed
    assert "Conv2d(3, 16, kernel_size=(3, 3)" in text and "Linear(in_features=2048, out_features=512" in text

    # training with validation: one metrics row per epoch, best.pt at the epoch with the lowest validation loss
    seed = out / "seed"
    rows = list(csv.DictReader((seed / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    best_epoch = min(rows, key=lambda r: float(r["val_loss"]))["epoch"]
    assert f"best.pt: epoch {best_epoch} of 2" in text

    # test evaluation: the printed overall accuracy and per-class counts match what train() stored for best.pt
    stored = json.loads((seed / "test_metrics.json").read_text())
    m = re.search(r"test accuracy \(overall\): ([\d.]+)% \((\d+)/(\d+)\)", text)
    assert m, "no overall test accuracy printed"
    assert float(m.group(1)) == pytest.approx(100 * stored["accuracy"], abs=0.005)
    assert int(m.group(3)) == stored["num_images"] == 10000
    assert int(m.group(2)) == round(stored["accuracy"] * 10000)
    per_class = re.findall(r"test accuracy of +(\w+): +[\d.]+% \((\d+)/1000\)", text)
    assert [name for name, _ in per_class] == stored["classes"]
    assert [int(n) for _, n in per_class] == [stored["confusion_matrix"][i][i] for i in range(10)]

    # figures shown inline: the batch, the class samples, curves, confusion, per class, predictions
    pngs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(pngs) >= 6

    # the faster recipe ran on the subset and was tested
    quick = json.loads((out / "quick" / "test_metrics.json").read_text())
    assert (out / "quick" / "best.pt").is_file()
    assert re.search(rf"quick: test accuracy +{100 * quick['accuracy']:.2f}%  \(1 epoch,", text)

    # ONNX export, checked against PyTorch
    report = json.loads((out / "seed.onnx.json").read_text())
    assert (out / "seed.onnx").is_file()
    assert report["parity_ok"] and report["parity"]["num_images"] == 200
    assert "ONNX and PyTorch agree on 16 of 16 images" in text
