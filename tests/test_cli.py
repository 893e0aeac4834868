"""The command line as a user meets it: help pages, --json, exit codes and one-line errors for bad input."""

from __future__ import annotations

import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from .conftest import make_tar, run_cli

SUBCOMMANDS = ["train", "evaluate", "models", "recipes", "info", "data"]


def assert_clean_error(proc, *fragments: str, code: int = 2) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and lines[0].startswith("cifar-cnn: error:")
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_help_shows_defaults(cmd: str) -> None:
    proc = run_cli(cmd, "--help")
    assert proc.returncode == 0 and "usage: cifar-cnn " + cmd in proc.stdout
    assert "--threads" in proc.stdout
    expected = {
        "train": "(default: cifar10; with --resume, the run's own source)",
        "evaluate": "(default: the data the checkpoint's run trained on, else cifar10)",
        "data": "(default: cifar10)",
    }
    if cmd in expected:
        assert expected[cmd] in " ".join(proc.stdout.split())


def test_train_and_evaluate_json(tmp_path: Path, official_dir: Path) -> None:
    out = tmp_path / "run"
    proc = run_cli(
        "train",
        "--data",
        str(official_dir),
        "--out",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "64",
        "--precision",
        "fp32",
        "--threads",
        "1",
        "--json",
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)  # stdout is exactly one JSON object
    assert summary["test_metrics"]["num_images"] == 200 and "epoch 1/1" in proc.stderr
    proc = run_cli("evaluate", str(out / "best.pt"), "--data", str(official_dir), "--json", "--precision", "fp32")
    assert proc.returncode == 0, proc.stderr
    m = json.loads(proc.stdout)
    for key in (
        "accuracy",
        "top5_accuracy",
        "per_class_accuracy",
        "per_class_f1",
        "confusion_matrix",
        "loss",
        "num_images",
        "classes",
    ):
        assert key in m
    assert 0 <= m["accuracy"] <= 1 and np.array(m["confusion_matrix"]).sum() == m["num_images"] == 200
    assert m == {**m, **json.loads((out / "test_metrics.json").read_text()), "checkpoint": m["checkpoint"]}
    proc = run_cli("evaluate", str(out / "best.pt"), "--data", str(official_dir), "--split", "val", "--json")
    assert json.loads(proc.stdout)["num_images"] == 120
    # a non-empty --out is refused without --resume or --overwrite, and nothing in it is touched
    before = (out / "best.pt").read_bytes()
    proc = run_cli("train", "--data", str(official_dir), "--out", str(out), "--epochs", "1")
    assert_clean_error(proc, "not empty", "--resume")
    assert (out / "best.pt").read_bytes() == before
    proc = run_cli("info", str(out / "best.pt"), "--json")
    assert json.loads(proc.stdout)["model"] == "seed_cnn"


def test_python_m_and_listing_commands() -> None:
    proc = run_cli("models", "--json")
    assert proc.returncode == 0 and "seed_cnn" in [m["name"] for m in json.loads(proc.stdout)["models"]]
    proc = run_cli("recipes")
    assert proc.returncode == 0 and proc.stdout.startswith("seed")


def _batch(data, labels) -> bytes:
    return pickle.dumps({"data": data, "labels": labels}, protocol=2)


def bad_sources(tmp: Path, official_dir: Path) -> dict[str, tuple[Path, str]]:
    """name -> (path, fragment the message must contain)."""
    cases = {}
    cases["missing path"] = (tmp / "does-not-exist", "no such file or folder")
    wrong_shape = tmp / "wrong_shape"
    wrong_shape.mkdir()
    for f in official_dir.iterdir():
        (wrong_shape / f.name).write_bytes(f.read_bytes())
    (wrong_shape / "data_batch_3").write_bytes(_batch(np.zeros((10, 1024), np.uint8), [0] * 10))
    cases["batch of wrong shape"] = (wrong_shape, "data_batch_3")
    out_of_range = tmp / "labels"
    out_of_range.mkdir()
    for f in official_dir.iterdir():
        (out_of_range / f.name).write_bytes(f.read_bytes())
    (out_of_range / "test_batch").write_bytes(_batch(np.zeros((10, 3072), np.uint8), [0] * 9 + [10]))
    cases["labels out of range"] = (out_of_range, "labels must be in 0..9")
    archive = make_tar(official_dir, tmp / "cifar-10-python.tar.gz")
    truncated = tmp / "truncated.tar.gz"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    cases["truncated archive"] = (truncated, "truncated")
    corrupt = tmp / "corrupt.tar.gz"
    corrupt.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 40)
    cases["corrupt archive"] = (corrupt, "corrupt.tar.gz")
    folder = tmp / "imgs"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (folder / split / cls).mkdir(parents=True)
            Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / split / cls / "0.png")
    (folder / "train" / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    cases["unreadable image"] = (folder, "1.png")
    empty = tmp / "empty_class"
    for split in ("train", "test"):
        (empty / split / "a").mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(empty / split / "a" / "0.png")
    (empty / "train" / "b").mkdir()
    cases["empty class folder"] = (empty, "at least 2 are needed")
    return cases


def test_bad_data_sources_exit_2_one_line(tmp_path: Path, official_dir: Path) -> None:
    for name, (path, fragment) in bad_sources(tmp_path, official_dir).items():
        proc = run_cli("data", "--data", str(path))
        assert_clean_error(proc, fragment)
        assert proc.stdout == "", name


def test_bad_checkpoints_exit_2(tmp_path: Path, official_dir: Path) -> None:
    not_ours = tmp_path / "model.pt"
    not_ours.write_bytes(b"just some bytes")
    assert_clean_error(run_cli("evaluate", str(not_ours), "--data", str(official_dir)), "model.pt", "not a cifar-cnn")
    assert_clean_error(run_cli("info", str(tmp_path / "nope.pt")), "no such checkpoint")


def test_bad_usage(tmp_path: Path, official_dir: Path) -> None:
    proc = run_cli("train", "--data", str(official_dir), "--lr", "-1", "--out", str(tmp_path / "r"))
    assert_clean_error(proc, "lr must be positive")
    assert not (tmp_path / "r").exists()
    proc = run_cli("train", "--model", "resnet9000")
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 0.1\n")
    assert_clean_error(run_cli("train", "--config", str(cfg), "--data", str(official_dir)), "learning_rate")


def test_archive_member_escaping_is_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tf:
        info = tarfile.TarInfo("../../outside.png")
        payload = b"x"
        info.size = len(payload)
        import io

        tf.addfile(info, io.BytesIO(payload))
    assert_clean_error(run_cli("data", "--data", str(evil)), "refusing archive member")
    assert not (tmp_path.parent.parent / "outside.png").exists()


def test_data_json_only_json_on_stdout(tmp_path: Path, official_dir: Path) -> None:
    proc = run_cli("data", "--data", str(official_dir), "--json")
    assert proc.returncode == 0
    d = json.loads(proc.stdout)
    assert d["train_images"] == 600 and d["test_images"] == 200 and "decoded" in proc.stderr


def test_seed_recipe_cli_print_config() -> None:
    proc = run_cli("train", "--recipe", "seed", "--print-config", "--json", "--lr", "0.05")
    cfg = json.loads(proc.stdout)
    assert cfg["lr"] == 0.05 and cfg["batch_size"] == 20 and cfg["model"] == "seed_cnn"
