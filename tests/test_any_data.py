"""Every command on every new kind of source, as a user runs them: CIFAR-100 (fine and coarse labels, also
downloaded from a server on 127.0.0.1), a folder of photos of many sizes and modes named by a CSV labels file with
a split column, and by a JSON-lines file without one. Commands after train find the data through the run's record
(no --data): evaluate, report, export, resume; show-data, data and tune take --data and its options."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_cnn.cli import main
from cifar_cnn.data import load_dataset
from tests.data_writers import write_cifar100
from tests.helpers import quiet
from tests.test_download import serving

TRAIN = ["--epochs", "1", "--batch-size", "64", "--lr", "0.01", "--precision", "fp32", "--no-progress"]


def photo(rng: np.random.Generator, kind: int, cls: int) -> Image.Image:
    """A photo-like image of one of several sizes and modes; the class shows in its brightness."""
    w, h = [(40, 30), (24, 24), (90, 50), (16, 28), (64, 64)][kind % 5]
    base = rng.integers(0, 120, (h, w, 3), dtype=np.uint8) + np.uint8(120 * cls)
    im = Image.fromarray(base)
    mode = ["RGB", "L", "RGBA", "P", "CMYK", "I;16"][kind % 6]
    if mode == "I;16":
        return Image.fromarray(np.asarray(im.convert("L"), dtype=np.uint16) * 257)
    return im.convert(mode) if mode != "P" else im.quantize(16)


def write_photos(root: Path, n: int, with_split: bool) -> list[dict]:
    rng = np.random.default_rng(1)
    rows = []
    for i in range(n):
        cls = i % 2
        im = photo(rng, i, cls)
        fmt = "tiff" if im.mode in ("CMYK", "I;16") else "png"
        rel = f"photos/{'sub/' if i % 3 == 0 else ''}img{i}.{fmt}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if i % 7 == 0 and im.mode == "RGB":  # EXIF-rotated JPEG
            exif = Image.Exif()
            exif[0x0112] = 6
            rel = rel.rsplit(".", 1)[0] + ".jpg"
            im.save(root / rel, "JPEG", exif=exif)
        else:
            im.save(root / rel)
        row = {"path": rel, "label": ["dark", "light"][cls]}
        if with_split:
            row["split"] = "test" if i % 5 == 0 else "val" if i % 5 == 1 else "train"
        rows.append(row)
    return rows


def csv_source(tmp_path: Path) -> tuple[list[str], int]:
    root = tmp_path / "csvdata"
    rows = write_photos(root, 120, with_split=True)
    text = "path,label,split\n" + "".join(f"{r['path']},{r['label']},{r['split']}\n" for r in rows)
    (root / "labels.csv").write_text(text)
    return ["--data", str(root), "--labels", str(root / "labels.csv")], 2


def jsonl_source(tmp_path: Path) -> tuple[list[str], int]:
    root = tmp_path / "jsonldata"
    rows = write_photos(root, 100, with_split=False)
    (root / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["--data", str(root), "--labels", str(root / "labels.jsonl")], 2


def cifar100_source(tmp_path: Path) -> tuple[list[str], int]:
    written = write_cifar100(tmp_path / "c100" / "cifar-100-python", n_train_per_class=3, n_test_per_class=1)
    return ["--data", str(written.path.parent)], 100


def cifar100_coarse_source(tmp_path: Path) -> tuple[list[str], int]:
    args, _ = cifar100_source(tmp_path)
    return [*args, "--label-set", "coarse"], 20


SOURCES = {"csv": csv_source, "jsonl": jsonl_source, "cifar100": cifar100_source, "coarse": cifar100_coarse_source}


def cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("kind", list(SOURCES))
def test_every_command_on_the_source(kind: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data_args, num_classes = SOURCES[kind](tmp_path)
    run = tmp_path / "run"
    code, out, err = cli(capsys, "train", *data_args, *TRAIN, "--out", str(run), "--no-report", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert len(result["test_metrics"]["classes"]) == num_classes
    recorded = json.loads((run / "run.json").read_text())["data_source"]
    if "--labels" in data_args:
        assert recorded["options"]["labels"] == data_args[data_args.index("--labels") + 1]
    if "--label-set" in data_args:
        assert recorded["options"]["label_set"] == "coarse"
    # the run's own source, with its options, is found without --data
    code, out, err = cli(capsys, "evaluate", str(run / "best.pt"), "--json")
    assert code == 0, err
    assert json.loads(out)["accuracy"] == pytest.approx(result["test_metrics"]["accuracy"])
    code, out, err = cli(capsys, "train", "--resume", str(run / "last.pt"), "--epochs", "2", "--no-progress")
    assert code == 0 and "epoch 2/2" in out, err
    code, out, err = cli(capsys, "report", str(run), "--json")
    assert code == 0 and (run / "report" / "index.html").is_file(), err
    code, out, err = cli(
        capsys, "export", str(run / "best.pt"), "--format", "torchscript", "--out", str(tmp_path / "m.pt")
    )
    assert code == 0, err
    assert torch.jit.load(str(tmp_path / "m.pt"))(torch.zeros(1, 3, 32, 32)).shape == (1, num_classes)
    # the commands that take --data
    code, out, err = cli(capsys, "data", *data_args, "--json")
    assert code == 0 and len(json.loads(out)["classes"]) == num_classes, err
    code, out, err = cli(capsys, "show-data", *data_args, "--out", str(tmp_path / "s.png"), "--per-class", "1")
    assert code == 0 and (tmp_path / "s.png").is_file(), err


def test_labels_without_a_split_column_get_a_test_split_by_path(tmp_path: Path) -> None:
    from cifar_cnn.data import DataSource

    args, _ = jsonl_source(tmp_path)
    log: list[str] = []
    ds = load_dataset(DataSource.of(args[1], labels=args[3]), 32, log=log.append)
    held = np.bincount(ds.test_labels, minlength=2)
    assert (held >= 3).all() and (held <= 20).all() and len(ds.train_labels) + held.sum() == 100  # ~20% of each 50
    assert any(f"have no split column: {held.sum()} of 100 training rows" in m for m in log)
    again = load_dataset(DataSource.of(args[1], labels=args[3], test_split=0.4), 32, log=quiet)
    assert len(again.test_labels) > held.sum()  # test_split is an option of the source
    # the same rows are test rows whatever the order of the file
    rows = (Path(args[3]).read_text().splitlines())[::-1]
    Path(args[3]).write_text("\n".join(rows) + "\n")
    reordered = load_dataset(DataSource.of(args[1], labels=args[3]), 32, log=quiet)
    assert np.array_equal(np.sort(reordered.test_labels), np.sort(ds.test_labels))
    assert reordered.fingerprint()["sha256"] == ds.fingerprint()["sha256"]


def test_cifar100_labels_match_what_was_written(tmp_path: Path) -> None:
    from cifar_cnn.data import DataSource

    written = write_cifar100(tmp_path / "cifar-100-python", n_train_per_class=2, n_test_per_class=1)
    fine = load_dataset(str(written.path), 32, log=quiet)
    coarse = load_dataset(DataSource.of(str(written.path), label_set="coarse"), 32, log=quiet)
    assert fine.classes == written.fine_names and coarse.classes == written.coarse_names
    # each image's red plane holds its fine label (see write_cifar100); coarse = fine_to_coarse of it
    red = fine.train_images[:, 0, 0, 0].astype(int)
    assert np.array_equal(red, fine.train_labels)
    assert np.array_equal(
        np.sort(written.fine_to_coarse[coarse.train_images[:, 0, 0, 0].astype(int)]), np.sort(coarse.train_labels)
    )


def test_data_cifar100_downloads_from_the_mirror(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    written = write_cifar100(tmp_path / "src" / "cifar-100-python", n_train_per_class=1, n_test_per_class=1)
    www = tmp_path / "www"
    www.mkdir()
    with tarfile.open(www / "cifar-100-python.tar.gz", "w:gz") as tf:
        tf.add(written.path, arcname="cifar-100-python")
    md5 = hashlib.md5((www / "cifar-100-python.tar.gz").read_bytes()).hexdigest()
    with serving(www) as url:
        monkeypatch.setenv("CIFAR_CNN_CIFAR100_URL", f"{url}/cifar-100-python.tar.gz")
        monkeypatch.setenv("CIFAR_CNN_CIFAR100_MD5", md5)
        code, out, err = cli(capsys, "data", "--data", "cifar100", "--label-set", "coarse", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["classes"] == written.coarse_names and summary["train_images"] == 100
    monkeypatch.setenv("CIFAR_CNN_CIFAR100_MD5", "0" * 32)  # already downloaded and extracted: no second fetch
    code, out, err = cli(capsys, "data", "--data", "cifar100", "--json")
    assert code == 0 and json.loads(out)["classes"] == written.fine_names, err


def test_tune_takes_the_labels_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("optuna")
    data_args, _ = csv_source(tmp_path)
    out = tmp_path / "study"
    code, stdout, err = cli(
        capsys, "tune", *data_args, "--trials", "1", "--out", str(out), "--epochs", "1", "--batch-size", "32", "--json"
    )
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["trials"] and (out / "best.yaml").is_file()
    trial_run = json.loads(next((out / "trials").glob("*/run.json")).read_text())
    assert trial_run["data_source"]["options"]["labels"] == data_args[3]  # the trials trained on the labelled data
