"""The bad-input catalogue (docs/bad-input.md): every command-line case (CASES) exits with code 2 and a one-line
message that names the file or value, and leaves an earlier run's files byte-for-byte as they were; every HTTP case
(HTTP_CASES, sent to a real `cifar-cnn serve` on 127.0.0.1) gets its exact 4xx status and a one-line JSON message
that names what was wrong, and the server answers /health afterwards."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import struct
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from cifar_cnn import resolve_config, train
from cifar_cnn.cli import main

from . import bad_input_checkpoint, bad_input_data, bad_input_names, bad_input_rundir, bad_input_serve, bad_input_tune
from .bad_input_kit import (
    MIB,
    Case,
    Env,
    HttpCase,
    ckpt_file,
    good_tree_files,
    png,
    png_header_only,
    streamed_body,
    upload,
)
from .conftest import make_images, make_tar, write_official_batches
from .model_fixtures import Server


def batch(**d) -> bytes:
    return pickle.dumps(d, protocol=2)


def bomb_png() -> bytes:
    """A tiny PNG whose header claims 30000 x 30000 pixels (900 MP): a decompression bomb."""
    buf = io.BytesIO()
    Image.new("1", (30000, 30000)).save(buf, format="PNG")
    return buf.getvalue()


def odd_dds() -> bytes:
    """A DDS file whose pixel format Pillow does not implement (Pillow raises NotImplementedError, not OSError)."""
    buf = io.BytesIO()
    Image.new("RGBA", (4, 4)).save(buf, format="DDS")
    blob = bytearray(buf.getvalue())
    blob[80:88] = struct.pack("<I", 4) + b"ABCD"  # pixel format flags: FOURCC; FOURCC: an unknown one
    return bytes(blob)


class Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/cifar_cnn_bad_input_pwned",))


def tar_with(tmp: Path, name: str, member: str) -> Path:
    path = tmp / name
    with tarfile.open(path, "w") as tf:
        data = png()
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return path


def truncated(path: Path, fraction: float = 0.5) -> bytes:
    blob = path.read_bytes()
    return blob[: int(len(blob) * fraction)]


def other_classes_data(e: Env) -> Path:
    x, y = make_images(5, num_classes=3)
    return write_official_batches(e.tmp / "three", x, y, x, y, classes=["p", "q", "r"])


def same_classes_other_pixels(e: Env) -> Path:
    """The finished run's data (see finished_run) with every training pixel inverted: same classes and counts."""
    x, y = make_images(20, seed=1)
    return write_official_batches(e.tmp / "inverted", 255 - x, y, x[:50], y[:50])


# (id, area, what, argv builder, fragment the message must contain)
def labelled(e: Env, text: str, name: str = "labels.csv") -> list[str]:
    """--data DIR --labels FILE for a folder of three good PNGs (a/0.png, a/1.png, a/2.png), a junk file a/junk.png
    and a labels file holding `text`."""
    root = e.tree({"a/0.png": png(), "a/1.png": png(), "a/2.png": png(), "a/junk.png": b"not an image"}, "labelled")
    (root / name).write_text(text)
    return ["--data", str(root), "--labels", str(root / name)]


def cifar100_without_meta(e: Env) -> Path:
    from tests.data_writers import write_cifar100

    folder = write_cifar100(e.tmp / "c100" / "cifar-100-python", n_train_per_class=1, n_test_per_class=1).path
    (folder / "meta").unlink()
    return folder


BASE_CASES: list[Case] = [
    (
        "missing-path",
        "data",
        "--data names nothing",
        lambda e: e.train_into_run("--data", str(e.tmp / "nope")),
        "no such file or folder",
    ),
    (
        "not-an-archive",
        "data",
        "--data is a plain file",
        lambda e: ["data", "--data", str(e.tree({"x.txt": b"hi"}) / "x.txt")],
        "not a folder or a .tar",
    ),
    (
        "unknown-folder",
        "data",
        "a folder with neither batches nor train/",
        lambda e: ["data", "--data", str(e.tree({"readme.md": b"x"}, "plain"))],
        "found neither CIFAR batches",
    ),
    (
        "corrupt-tar-gz",
        "data",
        "random bytes named .tar.gz",
        lambda e: e.train_into_run(
            "--data", str(e.tree({"c.tar.gz": b"\x1f\x8b\x08" + bytes(500)}, "ct") / "c.tar.gz")
        ),
        "c.tar.gz",
    ),
    (
        "truncated-tar-gz",
        "data",
        "an official archive cut in half",
        lambda e: [
            "data",
            "--data",
            str(
                e.tree({"cifar-10-python.tar.gz": truncated(make_tar(e.official, e.tmp / "full.tar.gz"))}, "tt")
                / "cifar-10-python.tar.gz"
            ),
        ],
        "truncated",
    ),
    (
        "truncated-zip",
        "data",
        "an image-folder zip cut short",
        lambda e: [
            "data",
            "--data",
            str(e.tree({"d.zip": truncated(_zip_of(e, good_tree_files()), 0.7)}, "tz") / "d.zip"),
        ],
        "d.zip",
    ),
    (
        "pickle-wrong-object",
        "data",
        "a batch that pickles a list, not a dict",
        lambda e: ["data", "--data", str(e.official_with("data_batch_2", pickle.dumps([1, 2, 3], protocol=2)))],
        "expected a pickled dict",
    ),
    (
        "pickle-code-gadget",
        "data",
        "a batch that would run code when unpickled",
        lambda e: ["data", "--data", str(e.official_with("data_batch_1", pickle.dumps({"data": Evil()})))],
        "posix.system",
    ),
    (
        "pickle-garbage",
        "data",
        "a batch file that is not a pickle",
        lambda e: ["data", "--data", str(e.official_with("test_batch", b"\x00garbage" * 10))],
        "test_batch",
    ),
    (
        "batch-wrong-shape",
        "data",
        "data of shape (n, 1024)",
        lambda e: [
            "data",
            "--data",
            str(e.official_with("data_batch_3", batch(data=np.zeros((4, 1024), np.uint8), labels=[0] * 4))),
        ],
        "(n, 3072)",
    ),
    (
        "batch-wrong-dtype",
        "data",
        "float32 pixels",
        lambda e: [
            "data",
            "--data",
            str(e.official_with("data_batch_3", batch(data=np.zeros((4, 3072), np.float32), labels=[0] * 4))),
        ],
        "uint8",
    ),
    (
        "labels-out-of-range",
        "data",
        "a label of 10 in a 10-class set",
        lambda e: [
            "data",
            "--data",
            str(e.official_with("test_batch", batch(data=np.zeros((2, 3072), np.uint8), labels=[0, 10]))),
        ],
        "labels must be in 0..9",
    ),
    (
        "labels-count",
        "data",
        "fewer labels than images",
        lambda e: [
            "data",
            "--data",
            str(e.official_with("test_batch", batch(data=np.zeros((3, 3072), np.uint8), labels=[0, 1]))),
        ],
        "'labels' must be 3 integers",
    ),
    (
        "labels-not-integers",
        "data",
        "labels given as strings",
        lambda e: [
            "data",
            "--data",
            str(e.official_with("test_batch", batch(data=np.zeros((2, 3072), np.uint8), labels=["a", "b"]))),
        ],
        "'labels' must be 2 integers",
    ),
    (
        "missing-batch",
        "data",
        "data_batch_4 absent",
        lambda e: ["data", "--data", str(_without(e, "data_batch_4"))],
        "missing data_batch_4",
    ),
    (
        "no-test-split",
        "data",
        "an image folder without test/",
        lambda e: [
            "data",
            "--data",
            str(e.tree({k: v for k, v in good_tree_files().items() if k.startswith("train")}, "nt")),
        ],
        "no images under test/",
    ),
    (
        "single-class",
        "data",
        "train/ with one class",
        lambda e: ["data", "--data", str(e.tree(good_tree_files(classes=("only",)), "one"))],
        "at least 2 are needed",
    ),
    (
        "empty-class-folder",
        "data",
        "a class folder with no images",
        lambda e: ["data", "--data", str(_with_empty_class(e))],
        "at least 2 are needed",
    ),
    (
        "test-class-unknown",
        "data",
        "test/ has a class train/ lacks",
        lambda e: ["data", "--data", str(e.tree({**good_tree_files(), "test/zebra/0.png": png()}, "tc"))],
        "zebra",
    ),
    (
        "corrupt-image",
        "images",
        "a .png that is not a PNG",
        lambda e: e.train_into_run(
            "--data", str(e.tree({**good_tree_files(), "train/a/bad.png": b"\x89PNG\r\n\x1a\nxx"}, "ci"))
        ),
        "bad.png",
    ),
    (
        "truncated-image",
        "images",
        "a JPEG cut in half",
        lambda e: ["data", "--data", str(e.tree({**good_tree_files(), "train/b/half.jpg": _half_jpeg()}, "ti"))],
        "half.jpg",
    ),
    (
        "decompression-bomb",
        "images",
        "a PNG claiming 900 megapixels",
        lambda e: ["data", "--data", str(e.tree({**good_tree_files(), "train/a/bomb.png": bomb_png()}, "db"))],
        "bomb.png",
    ),
    (
        "unsupported-image",
        "images",
        "a DDS file in a pixel format Pillow cannot read",
        lambda e: ["data", "--data", str(e.tree({**good_tree_files(), "train/b/odd.dds": odd_dds()}, "ui"))],
        "odd.dds: unreadable",
    ),
    (
        "archive-dotdot",
        "data",
        "an archive member named ../x",
        lambda e: ["data", "--data", str(tar_with(e.tmp, "dd.tar", "../../train/a/x.png"))],
        "refusing archive member",
    ),
    (
        "archive-absolute",
        "data",
        "an archive member named /etc/x",
        lambda e: ["data", "--data", str(tar_with(e.tmp, "abs.tar", "/etc/cifar_x.png"))],
        "refusing archive member",
    ),
    (
        "config-unknown-key",
        "config",
        "a misspelt key",
        lambda e: e.train_into_run("--data", str(e.official), "--config", str(_cfg(e, "u.yaml", "learnrate: 0.1\n"))),
        "unknown config key(s) learnrate",
    ),
    (
        "config-wrong-type",
        "config",
        "epochs: ten",
        lambda e: e.train_into_run("--data", str(e.official), "--config", str(_cfg(e, "t.yaml", "epochs: ten\n"))),
        "'epochs' must be an integer",
    ),
    (
        "config-bool-type",
        "config",
        "flip: 3",
        lambda e: e.train_into_run("--data", str(e.official), "--config", str(_cfg(e, "b.toml", "flip = 3\n"))),
        "'flip' must be true or false",
    ),
    (
        "config-bad-choice",
        "config",
        "optimizer: rmsprop",
        lambda e: e.train_into_run(
            "--data", str(e.official), "--config", str(_cfg(e, "c.yaml", "optimizer: rmsprop\n"))
        ),
        "must be one of sgd, adam, adamw",
    ),
    (
        "ema-decay-one",
        "config",
        "--ema-decay 1 (the average would never move)",
        lambda e: e.train_into_run("--data", str(e.official), "--ema-decay", "1"),
        "ema_decay must be in [0, 1)",
    ),
    (
        "bench-target-percent",
        "config",
        "bench --target 67 (a percentage, not a fraction)",
        lambda e: ["bench", "--to-target", "--target", "67", "--data", str(e.official), "--out", str(e.run)],
        "--target 67.0 is not an accuracy",
    ),
    (
        "config-bad-yaml",
        "config",
        "YAML that does not parse",
        lambda e: e.train_into_run("--data", str(e.official), "--config", str(_cfg(e, "y.yaml", "lr: [0.1\n"))),
        "not valid YAML",
    ),
    (
        "config-bad-toml",
        "config",
        "TOML that does not parse",
        lambda e: e.train_into_run("--data", str(e.official), "--config", str(_cfg(e, "y.toml", "lr = = 1\n"))),
        "not valid TOML",
    ),
    (
        "config-not-mapping",
        "config",
        "a YAML list",
        lambda e: e.train_into_run("--data", str(e.official), "--config", str(_cfg(e, "l.yaml", "- 1\n- 2\n"))),
        "expected a mapping",
    ),
    (
        "config-missing",
        "config",
        "--config names nothing",
        lambda e: e.train_into_run("--data", str(e.official), "--config", str(e.tmp / "none.yaml")),
        "no such file",
    ),
    (
        "config-suffix",
        "config",
        "an .ini file",
        lambda e: e.train_into_run("--data", str(e.official), "--config", str(_cfg(e, "c.ini", "[x]\n"))),
        "use a .yaml, .yml or .toml file",
    ),
    (
        "value-out-of-range",
        "config",
        "--val-split 1.5",
        lambda e: e.train_into_run("--data", str(e.official), "--val-split", "1.5"),
        "val_split must be in [0, 1)",
    ),
    (
        "negative-lr",
        "config",
        "--lr -1",
        lambda e: e.train_into_run("--data", str(e.official), "--lr", "-1"),
        "lr must be positive",
    ),
    (
        "subset-too-large",
        "config",
        "--subset larger than the data",
        lambda e: e.train_into_run("--data", str(e.official), "--subset", "100000"),
        "--subset must be between",
    ),
    (
        "model-arg-malformed",
        "config",
        "--model-arg without =",
        lambda e: e.train_into_run("--data", str(e.official), "--model-arg", "dropout"),
        "expected KEY=VALUE",
    ),
    (
        "model-arg-unknown",
        "config",
        "an argument the model lacks",
        lambda e: e.train_into_run("--data", str(e.official), "--model-arg", "width=3"),
        "takes no argument width",
    ),
    (
        "cuda-without-gpu",
        "config",
        "--device cuda on a CPU-only machine",
        lambda e: e.train_into_run("--data", str(e.official), "--device", "cuda"),
        "no CUDA GPU",
    ),
    (
        "fp16-on-cpu",
        "config",
        "--precision fp16 on a CPU",
        lambda e: e.train_into_run("--data", str(e.official), "--device", "cpu", "--precision", "fp16"),
        "fp16 is for CUDA",
    ),
    (
        "out-is-a-file",
        "config",
        "--out names a file",
        lambda e: ["train", "--data", str(e.official), "--out", str(e.run / "metrics.csv")],
        "exists and is not a folder",
    ),
    (
        "out-not-empty",
        "config",
        "--out holds a run, no --overwrite",
        lambda e: ["train", "--data", str(e.official), "--out", str(e.run)],
        "folder is not empty",
    ),
    (
        "ckpt-random-bytes",
        "checkpoints",
        "a file that is not a checkpoint",
        lambda e: ["evaluate", str(ckpt_file(e, "r.pt", blob=os.urandom(300))), "--data", str(e.official)],
        "not a cifar-cnn checkpoint",
    ),
    (
        "ckpt-no-tag",
        "checkpoints",
        "a plain state dict",
        lambda e: ["info", str(ckpt_file(e, "sd.pt", {"w": torch.zeros(2)}))],
        "no 'cifar-cnn-checkpoint' format tag",
    ),
    (
        "ckpt-truncated",
        "checkpoints",
        "best.pt cut in half",
        lambda e: [
            "evaluate",
            str(ckpt_file(e, "half.pt", blob=truncated(e.run / "best.pt"))),
            "--data",
            str(e.official),
        ],
        "damaged",
    ),
    (
        "ckpt-malicious",
        "checkpoints",
        "a plain pickle that would run code",
        lambda e: ["info", str(ckpt_file(e, "evil.pkl", blob=pickle.dumps(Evil())))],
        "not a cifar-cnn checkpoint",
    ),
    (
        "ckpt-code-gadget",
        "checkpoints",
        "a torch zip checkpoint whose pickle would run code",
        lambda e: ["info", str(ckpt_file(e, "evil.pt", {"format": "cifar-cnn-checkpoint", "x": Evil()}))],
        "refers to posix.system",
    ),
    (
        "ckpt-missing",
        "checkpoints",
        "no such checkpoint",
        lambda e: ["info", str(e.tmp / "none.pt")],
        "no such checkpoint",
    ),
    (
        "ckpt-other-classes",
        "checkpoints",
        "evaluate on data with other classes",
        lambda e: ["evaluate", str(e.run / "best.pt"), "--data", str(other_classes_data(e))],
        "trained on classes",
    ),
    (
        "ckpt-other-model",
        "checkpoints",
        "weights of another shape",
        lambda e: ["evaluate", str(_mismatched_ckpt(e)), "--data", str(e.official)],
        "do not fit model",
    ),
    (
        "resume-other-data",
        "checkpoints",
        "--resume on data with other classes",
        lambda e: ["train", "--resume", str(e.run / "last.pt"), "--data", str(other_classes_data(e))],
        "differ from the data",
    ),
    (
        "resume-other-content",
        "checkpoints",
        "--resume with --data of the same classes and counts but other images",
        lambda e: [
            "train",
            "--resume",
            str(e.run / "last.pt"),
            "--epochs",
            "2",
            "--data",
            str(same_classes_other_pixels(e)),
        ],
        "content hash differs",
    ),
    (
        "resume-with-recipe",
        "checkpoints",
        "--resume together with --recipe",
        lambda e: ["train", "--resume", str(e.run / "last.pt"), "--recipe", "seed"],
        "drop --config and --recipe",
    ),
    ("usage-bad-choice", "usage", "an unknown --model", lambda e: ["train", "--model", "nope"], "invalid choice"),
    ("usage-bad-number", "usage", "--epochs two", lambda e: ["train", "--epochs", "two"], "invalid int value"),
    # labels files (--data DIR --labels FILE), CIFAR-100, random-resized crop
    (
        "labels-csv-short-row",
        "labels",
        "a CSV row with fewer fields than the header",
        lambda e: ["data", *labelled(e, "path,label\na/0.png,cat\na/1.png\n")],
        "labels.csv:3: 1 fields, but the header has 2",
    ),
    (
        "labels-csv-no-label-column",
        "labels",
        "a CSV file without a label column",
        lambda e: ["data", *labelled(e, "path,class\na/0.png,cat\n")],
        "labels.csv:1: no 'label' column",
    ),
    (
        "labels-jsonl-bad-json",
        "labels",
        "a JSON-lines row that is not JSON",
        lambda e: ["data", *labelled(e, '{"path": "a/0.png", "label": "cat"}\n{path: a/1.png}\n', "labels.jsonl")],
        "labels.jsonl:2: invalid JSON",
    ),
    (
        "labels-jsonl-missing-key",
        "labels",
        "a JSON-lines object without a label",
        lambda e: ["data", *labelled(e, '{"path": "a/0.png"}\n', "labels.jsonl")],
        'labels.jsonl:1: missing key "label"',
    ),
    (
        "labels-unknown-split",
        "labels",
        "a split that is not train, val or test",
        lambda e: ["data", *labelled(e, "path,label,split\na/0.png,cat,train\na/1.png,dog,testing\n")],
        "labels.csv:3: unknown split 'testing'",
    ),
    (
        "labels-class-without-training-images",
        "labels",
        "a class that appears only in the test split",
        lambda e: e.train_into_run(
            *labelled(e, "path,label,split\na/0.png,cat,train\na/1.png,cat,test\na/2.png,dog,test\n")
        ),
        "class 'dog' has no training images",
    ),
    (
        "labels-duplicate-path",
        "labels",
        "the same image listed twice",
        lambda e: ["data", *labelled(e, "path,label\na/0.png,cat\na/1.png,dog\na/0.png,dog\n")],
        "labels.csv:4: duplicate path a/0.png (also on line 2)",
    ),
    (
        "labels-path-leaves-dir",
        "labels",
        "a path that climbs out of --data with ..",
        lambda e: e.train_into_run(*labelled(e, "path,label\na/0.png,cat\n../outside.png,dog\n")),
        "labels.csv:3: the path ../outside.png leaves the image folder",
    ),
    (
        "labels-absolute-path",
        "labels",
        "an absolute path",
        lambda e: ["data", *labelled(e, "path,label\na/0.png,cat\n/etc/passwd,dog\n")],
        "labels.csv:3: the path /etc/passwd leaves the image folder",
    ),
    (
        "labels-missing-image",
        "labels",
        "a row naming a file that is not there",
        lambda e: e.train_into_run(*labelled(e, "path,label\na/0.png,cat\na/9.png,dog\n")),
        "labels.csv:3: a/9.png: no such file",
    ),
    (
        "labels-unreadable-image",
        "labels",
        "a row naming a file that is not an image",
        lambda e: ["data", *labelled(e, "path,label\na/0.png,cat\na/junk.png,dog\n")],
        "labels.csv:3: a/junk.png: not a readable image",
    ),
    (
        "labels-nothing-readable-with-skip-bad",
        "labels",
        "--skip-bad when no training image of a class is readable",
        lambda e: ["data", *labelled(e, "path,label\na/0.png,cat\na/1.png,cat\na/junk.png,dog\n"), "--skip-bad"],
        "no readable training image of 'dog' is left after skipping unreadable files",
    ),
    (
        "labels-unknown-suffix",
        "labels",
        "a labels file that is neither .csv nor .jsonl",
        lambda e: ["data", *labelled(e, "path,label\na/0.png,cat\n", "labels.txt")],
        "unknown labels file type '.txt'",
    ),
    (
        "labels-without-data",
        "labels",
        "--labels with no --data",
        lambda e: ["data", "--labels", str(e.tmp / "labels.csv")],
        "--labels FILE goes with --data DIR",
    ),
    (
        "coarse-labels-of-cifar10",
        "data",
        "--label-set coarse on CIFAR-10",
        lambda e: ["data", "--data", str(e.official), "--label-set", "coarse"],
        "only CIFAR-100 has a coarse label set",
    ),
    (
        "cifar100-without-meta",
        "data",
        "a cifar-100-python folder whose meta file is missing",
        lambda e: ["data", "--data", str(cifar100_without_meta(e))],
        "meta",
    ),
    (
        "crop-scale-out-of-range",
        "config",
        "--crop-scale 0 1.5",
        lambda e: e.train_into_run("--data", str(e.official), "--crop-scale", "0", "1.5"),
        "crop_scale must be MIN MAX with 0 < MIN <= MAX <= 1",
    ),
    (
        "hf-unknown-hub-id",
        "pretrained",
        "--model hf:ORG/NAME not in the hub cache, offline (HF_HUB_OFFLINE=1)",
        lambda e: e.offline(e.train_into_run("--data", str(e.official), "--model", "hf:no-such-org/no-such-model")),
        "is not in the Hugging Face cache",
    ),
    (
        "hf-folder-without-model",
        "pretrained",
        "--model hf:DIR, a folder without config.json",
        lambda e: e.train_into_run(
            "--data", str(e.official), "--model", f"hf:{e.tree({'notes.txt': b'x'}, 'nomodel')}"
        ),
        "has no config.json, so it holds no model",
    ),
    (
        "hf-not-an-image-classifier",
        "pretrained",
        "--model hf:DIR whose config.json is a text model (bert)",
        lambda e: e.train_into_run("--data", str(e.official), "--model", f"hf:{hf_folder(e, {'model_type': 'bert'})}"),
        "its config is a 'bert' model, not an image classifier",
    ),
    (
        "hf-remote-code",
        "pretrained",
        "--model hf:DIR whose config.json needs the model's own code (auto_map)",
        lambda e: e.train_into_run(
            "--data",
            str(e.official),
            "--model",
            f"hf:{hf_folder(e, {'model_type': 'resnet', 'auto_map': {'AutoModel': 'modeling_x.XModel'}})}",
        ),
        "trust_remote_code",
    ),
    (
        "freeze-epochs-beyond-epochs",
        "config",
        "--freeze-epochs 3 with --epochs 1",
        lambda e: e.train_into_run("--data", str(e.official), "--freeze-epochs", "3"),
        "freeze_epochs 3 must be below epochs 1",
    ),
    (
        "mixup-negative-alpha",
        "config",
        "--mixup-alpha -0.2",
        lambda e: e.train_into_run("--data", str(e.official), "--mixup-alpha", "-0.2"),
        "mixup_alpha must be >= 0, got -0.2",
    ),
    (
        "cutmix-negative-alpha",
        "config",
        "--cutmix-alpha -1",
        lambda e: e.train_into_run("--data", str(e.official), "--cutmix-alpha", "-1"),
        "cutmix_alpha must be >= 0, got -1.0",
    ),
    (
        "random-erasing-not-a-probability",
        "config",
        "--random-erasing 1.5",
        lambda e: e.train_into_run("--data", str(e.official), "--random-erasing", "1.5"),
        "random_erasing is a probability, in [0, 1], got 1.5",
    ),
    (
        "mix-prob-not-a-probability",
        "config",
        "--mix-prob -0.1",
        lambda e: e.train_into_run("--data", str(e.official), "--mixup-alpha", "0.2", "--mix-prob", "-0.1"),
        "mix_prob is a probability, in [0, 1], got -0.1",
    ),
    (
        "patience-without-validation",
        "config",
        "--patience 3 with --val-split 0",
        lambda e: e.train_into_run("--data", str(e.official), "--patience", "3", "--val-split", "0"),
        "patience needs a validation split",
    ),
    (
        "accum-steps-above-steps-per-epoch",
        "config",
        "--accum-steps 1000 with 4 batches an epoch",
        lambda e: e.train_into_run("--data", str(e.official), "--batch-size", "50", "--accum-steps", "1000"),
        "accum_steps 1000 is more than the 4 batches of an epoch",
    ),
    (
        "config-not-finite",
        "config",
        "--warmup-epochs inf",
        lambda e: e.train_into_run("--data", str(e.official), "--warmup-epochs", "inf"),
        "warmup_epochs=inf: every number must be finite",
    ),
    (
        "config-nan-in-a-list",
        "config",
        "--mean nan 0.5 0.5",
        lambda e: e.train_into_run("--data", str(e.official), "--mean", "nan", "0.5", "0.5"),
        "mean=(nan, 0.5, 0.5): every number must be finite",
    ),
    (
        "seed-negative",
        "config",
        "--seed -1",
        lambda e: e.train_into_run("--data", str(e.official), "--seed", "-1"),
        "seed must be in 0..2**63-1, got -1",
    ),
    (
        "evaluate-batch-size-zero",
        "usage",
        "evaluate --batch-size 0",
        lambda e: ["evaluate", str(e.run / "best.pt"), "--batch-size", "0"],
        "argument --batch-size: '0': expected a whole number of at least 1",
    ),
    (
        "export-tolerance-nan",
        "usage",
        "export --tolerance nan",
        lambda e: [
            "export",
            str(e.run / "best.pt"),
            "--format",
            "onnx",
            "--out",
            str(e.tmp / "m.onnx"),
            "--tolerance",
            "nan",
        ],
        "argument --tolerance: 'nan': expected a tolerance of at least 0",
    ),
    (
        "serve-port-out-of-range",
        "usage",
        "serve --port 70000",
        lambda e: ["serve", str(e.run / "best.pt"), "--port", "70000"],
        "argument --port: '70000': expected a TCP port between 0 and 65535",
    ),
    (
        "serve-upload-limit-nan",
        "usage",
        "serve --max-upload-mb nan",
        lambda e: ["serve", str(e.run / "best.pt"), "--max-upload-mb", "nan"],
        "argument --max-upload-mb: 'nan': expected a size in MB of at least 0.001",
    ),
    (
        "bench-seeds-not-numbers",
        "usage",
        "bench --seeds a",
        lambda e: ["bench", "--seeds", "a"],
        "argument --seeds: --seeds 'a': invalid int value: 'a'",
    ),
    (
        "bench-steps-zero",
        "usage",
        "bench --steps 0",
        lambda e: ["bench", "--steps", "0"],
        "argument --steps: '0': expected a whole number of at least 1",
    ),
    (
        "ckpt-nan-weights",
        "checkpoints",
        "serve a checkpoint whose weights hold a NaN (it does not start)",
        lambda e: ["serve", str(_nan_ckpt(e)), "--port", "0"],
        "its weights hold NaN or infinite values (fc2.bias): the run diverged",
    ),
    (
        "ckpt-state-not-tensors",
        "checkpoints",
        "predict with a checkpoint whose model_state is a list",
        lambda e: ["predict", str(ckpt_file(e, "list.pt", {**_plain_ckpt(e), "model_state": [1, 2]})), str(e.tmp)],
        "its model_state is not a mapping of weight names to tensors",
    ),
    # issue 15: explain and calibrate (rows go here)
    (
        "explain-unknown-layer",
        "explain",
        "explain --layer names no module of the model",
        lambda e: ["explain", str(e.run / "best.pt"), str(_one_png(e)), "--out", str(e.tmp / "o"), "--layer", "nope"],
        "--layer 'nope': the model has no such module",
    ),
    (
        "explain-layer-not-spatial",
        "explain",
        "explain --layer names a layer without a spatial feature map (Grad-CAM cannot use it)",
        lambda e: ["explain", str(e.run / "best.pt"), str(_one_png(e)), "--out", str(e.tmp / "o"), "--layer", "fc2"],
        "--layer 'fc2' does not output a spatial feature map",
    ),
    (
        "explain-nothing-readable",
        "explain",
        "explain a folder where no file is a readable image",
        lambda e: [
            "explain",
            str(e.run / "best.pt"),
            str(e.tree({"junk.png": b"not an image", "half.jpg": _half_jpeg()}, "unreadable")),
            "--out",
            str(e.tmp / "o"),
        ],
        "nothing to explain: no readable image among",
    ),
    (
        "explain-unknown-target-class",
        "explain",
        "explain --target-class that is neither a class nor an index",
        lambda e: [
            "explain",
            str(e.run / "best.pt"),
            str(_one_png(e)),
            "--out",
            str(e.tmp / "o"),
            "--target-class",
            "zebra",
        ],
        "--target-class 'zebra' is not one of the model's classes",
    ),
    (
        "explain-out-is-a-file",
        "explain",
        "explain --out names an existing file",
        lambda e: ["explain", str(e.run / "best.pt"), str(_one_png(e)), "--out", str(e.run / "run.json")],
        "exists and is not a folder",
    ),
    (
        "calibrate-on-test-split",
        "calibrate",
        "calibrate --split test (it would flatter the test figures)",
        lambda e: ["calibrate", str(e.run / "best.pt"), "--split", "test"],
        "--split test: fitting the temperature on the test split would flatter",
    ),
    (
        "calibrate-no-held-out-images",
        "calibrate",
        "calibrate a checkpoint whose run trained on all images without --calibrate",
        lambda e: ["calibrate", str(_all_images_ckpt(e)), "--out", str(e.tmp / "c.pt"), "--threads", "1"],
        "has no validation images to fit a temperature on",
    ),
    (
        "checkpoint-temperature-nan",
        "checkpoint",
        "a checkpoint whose temperature is NaN",
        lambda e: [
            "predict",
            str(ckpt_file(e, "t.pt", {**_plain_ckpt(e), "temperature": float("nan")})),
            str(_one_png(e)),
        ],
        "its temperature nan is not a positive finite number",
    ),
    (
        "train-calibration-images-too-many",
        "config",
        "train --calibrate --val-split 0 holding out every training image",
        lambda e: e.train_into_run(
            "--data", str(e.official), "--calibrate", "--val-split", "0", "--calibration-images", "100000"
        ),
        "calibration_images 100000 leaves nothing to train on",
    ),
    (
        "train-resume-calibrate-changed",
        "config",
        "train --resume with --calibrate added (it would change which images are held out)",
        lambda e: ["train", "--resume", str(e.run / "last.pt"), "--calibrate", "--epochs", "2"],
        "--calibrate cannot change on --resume",
    ),
    (
        "train-calibration-images-zero",
        "config",
        "--calibration-images 0",
        lambda e: e.train_into_run("--calibrate", "--calibration-images", "0"),
        "calibration_images must be at least 1",
    ),
    # issue 15: int8 export (rows go here)
    (
        "export-int8-torchscript",
        "usage",
        "export --format torchscript --int8 (int8 is for ONNX only)",
        lambda e: ["export", str(e.run / "best.pt"), "--format", "torchscript", "--int8", "--out", str(e.tmp / "m.ts")],
        "--int8 quantizes ONNX models only; use --format onnx instead of --format torchscript",
    ),
    (
        "export-max-accuracy-drop-nan",
        "usage",
        "export --int8 --max-accuracy-drop nan",
        lambda e: [
            "export",
            str(e.run / "best.pt"),
            "--format",
            "onnx",
            "--int8",
            "--out",
            str(e.tmp / "m.onnx"),
            "--max-accuracy-drop",
            "nan",
        ],
        "argument --max-accuracy-drop: 'nan': expected points of accuracy between -100 and 100",
    ),
]


def hf_folder(e: Env, config: dict) -> Path:
    """A save_pretrained-like folder holding only `config` as its config.json."""
    return e.tree(
        {"config.json": json.dumps(config).encode()}, f"hf_{hashlib.md5(json.dumps(config).encode()).hexdigest()[:8]}"
    )


BASE_HTTP_CASES: list[HttpCase] = [
    (
        "http-not-an-image",
        "http",
        "a text file uploaded as the image",
        lambda: upload(b"hello, I am not a picture", "notes.txt"),
        422,
        "notes.txt: not a readable image",
    ),
    ("http-empty-upload", "http", "an empty file", lambda: upload(b"", "empty.png"), 400, "empty.png: empty upload"),
    (
        "http-oversized",
        "http",
        "an image 4 KiB over the 1 MiB limit",
        lambda: upload(bytes(MIB + 4096), "big.jpg"),
        413,
        "big.jpg: upload too large",
    ),
    (
        "http-oversized-body",
        "http",
        "a 2 MiB body (refused from its Content-Length)",
        lambda: upload(bytes(2 * MIB), "huge.jpg"),
        413,
        "upload too large: the limit is 1,048,576 bytes",
    ),
    (
        "http-oversized-streamed",
        "http",
        "a 2 MiB body sent chunked, without Content-Length",
        lambda: streamed_body(2 * MIB),
        413,
        "upload too large",
    ),
    (
        "http-decompression-bomb",
        "http",
        "a PNG claiming 8000 x 8000 pixels",
        lambda: upload(png_header_only(8000, 8000), "bomb.png"),
        422,
        "possible decompression bomb",
    ),
    (
        "http-truncated-image",
        "http",
        "a JPEG cut in half",
        lambda: upload(_half_jpeg(), "half.jpg"),
        422,
        "half.jpg: unreadable or truncated image",
    ),
    (
        "http-unsupported-image",
        "http",
        "a DDS file in a pixel format Pillow cannot read",
        lambda: upload(odd_dds(), "odd.dds"),
        422,
        "odd.dds: unreadable",
    ),
    (
        "http-top-k-zero",
        "http",
        "?top_k=0",
        lambda: upload(png(), top_k="0"),
        422,
        "top_k: Input should be greater than or equal to 1 (got '0')",
    ),
    (
        "http-top-k-negative",
        "http",
        "?top_k=-3",
        lambda: upload(png(), top_k="-3"),
        422,
        "top_k: Input should be greater than or equal to 1 (got '-3')",
    ),
    (
        "http-top-k-not-integer",
        "http",
        "?top_k=2.5",
        lambda: upload(png(), top_k="2.5"),
        422,
        "top_k: Input should be a valid integer",
    ),
    (
        "http-top-k-word",
        "http",
        "?top_k=five",
        lambda: upload(png(), top_k="five"),
        422,
        "top_k: Input should be a valid integer",
    ),
    (
        "http-top-k-huge",
        "http",
        "?top_k= a 5000-digit number (a merely large one, such as 10^20, is clamped to the classes)",
        lambda: upload(png(), top_k="9" * 5000),
        422,
        "top_k: Unable to parse input string as an integer",
    ),
    (
        "http-missing-file",
        "http",
        "a form without the file field",
        lambda: {"data": {"image": "x"}},
        422,
        "file: no image file",
    ),
    (
        "http-file-as-text",
        "http",
        "file sent as a text field, not a file",
        lambda: {"data": {"file": "hello"}},
        422,
        "file: no image file",
    ),
    (
        "http-json-body",
        "http",
        "JSON instead of multipart/form-data",
        lambda: {"json": {"file": "aGVsbG8="}},
        422,
        "file: no image file",
    ),
    (
        "http-raw-image-body",
        "http",
        "the image as the raw body (Content-Type: image/png)",
        lambda: {"content": png(), "headers": {"content-type": "image/png"}},
        422,
        "file: no image file",
    ),
    (
        "http-no-boundary",
        "http",
        "multipart/form-data without a boundary",
        lambda: {"content": b"x", "headers": {"content-type": "multipart/form-data"}},
        400,
        "Missing boundary",
    ),
    ("http-wrong-method", "http", "GET /predict", lambda: {"method": "GET"}, 405, "Method Not Allowed"),
]


def _zip_of(e: Env, files: dict[str, bytes]) -> Path:
    path = e.tmp / "z.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for rel, blob in files.items():
            zf.writestr(rel, blob)
    return path


def _without(e: Env, name: str) -> Path:
    folder = e.tmp / "without"
    folder.mkdir()
    for f in e.official.iterdir():
        if f.name != name:
            (folder / f.name).write_bytes(f.read_bytes())
    return folder


def _with_empty_class(e: Env) -> Path:
    root = e.tree(good_tree_files(classes=("a",)), "ec")
    (root / "train" / "b").mkdir()
    return root


def _half_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def _cfg(e: Env, name: str, text: str) -> Path:
    (e.tmp / name).write_text(text)
    return e.tmp / name


def _plain_ckpt(e: Env) -> dict:
    return torch.load(e.run / "best.pt", weights_only=True)


def _one_png(e: Env) -> Path:
    path = e.tmp / "one.png"
    path.write_bytes(png())
    return path


def _all_images_ckpt(e: Env) -> Path:
    """The finished run's best.pt as if its run had trained on all images (val_split 0) without --calibrate."""
    ckpt = torch.load(e.run / "best.pt", weights_only=True)
    ckpt["config"]["val_split"] = 0.0
    path = e.tmp / "all.pt"
    torch.save(ckpt, path)
    return path


def _nan_ckpt(e: Env) -> Path:
    ckpt = torch.load(e.run / "best.pt", weights_only=True)
    ckpt["model_state"]["fc2.bias"][0] = float("nan")
    path = e.tmp / "nan.pt"
    torch.save(ckpt, path)
    return path


def _mismatched_ckpt(e: Env) -> Path:
    ckpt = torch.load(e.run / "best.pt", weights_only=True)
    ckpt["model_state"]["fc1.weight"] = torch.zeros(7, 7)
    path = e.tmp / "mismatch.pt"
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("bad_input_run")
    x, y = make_images(20, seed=1)
    official = write_official_batches(tmp / "official", x, y, x[:50], y[:50])
    cfg = resolve_config("seed", None, {"epochs": 1, "batch_size": 50, "device": "cpu", "precision": "fp32"})
    train(cfg, str(official), tmp / "run", home=tmp / "home", log=lambda m: None, threads=1)
    return official, tmp / "run"


def snapshot(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


AREAS = (bad_input_data, bad_input_serve, bad_input_checkpoint, bad_input_rundir, bad_input_names, bad_input_tune)
CASES: list[Case] = BASE_CASES + [case for area in AREAS for case in area.CASES]
HTTP_CASES: list[HttpCase] = BASE_HTTP_CASES + [case for area in AREAS for case in area.HTTP_CASES]


def test_catalogue_is_large_and_unique() -> None:
    ids = [c[0] for c in CASES + HTTP_CASES]
    assert len(ids) == len(set(ids)) and len(CASES) >= 30 and len(HTTP_CASES) >= 6
    assert {c[1] for c in HTTP_CASES} == {"http"} and all(400 <= c[4] < 500 for c in HTTP_CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(
    case: Case, tmp_path: Path, finished_run, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    official, run_dir = finished_run
    marker = Path("/tmp/cifar_cnn_bad_input_pwned")
    marker.unlink(missing_ok=True)
    env = Env(tmp_path, official, run_dir, monkeypatch)
    argv = case[3](env)
    before = snapshot(run_dir)
    with pytest.raises(SystemExit) as exc:  # argparse exits; our commands return
        raise SystemExit(main(argv))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exc.value.code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert case[4] in lines[0], (case[4], lines[0])
    assert snapshot(run_dir) == before, "an earlier run's files changed"
    assert not marker.exists(), "pickled code ran"


@pytest.fixture(scope="module")
def http_server(finished_run, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`cifar-cnn serve` on the finished run's best.pt (read only), on 127.0.0.1, with a 1 MiB upload limit."""
    log = tmp_path_factory.mktemp("bad_input_server") / "serve.log"
    srv = Server(finished_run[1] / "best.pt", log, "--threads", "1", "--max-upload-mb", "1", "--log-level", "warning")
    yield srv
    srv.stop()
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.mark.parametrize("case", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_bad_http_request(case: HttpCase, http_server: Server) -> None:
    _, _, _, build, status, fragment = case
    request = {"method": "POST", "url": f"{http_server.url}/predict", "timeout": 30, **build()}
    response = httpx.request(**request)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json" and "\n" not in response.text, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and fragment in detail, (fragment, detail)
    assert http_server.proc.poll() is None, "the server exited"
    assert httpx.get(f"{http_server.url}/health", timeout=10).json()["status"] == "ok"


def catalogue_markdown() -> str:
    """The table of docs/bad-input.md, generated from CASES and HTTP_CASES so the two never drift apart."""
    rows = ["| # | area | case | what the user sees |", "|---|---|---|---|"]
    for i, (cid, area, what, _, fragment) in enumerate(CASES, 1):
        rows.append(f"| {i} | {area} | `{cid}`: {what} | exit code 2, `...{fragment}...` |")
    for i, (cid, area, what, _, status, fragment) in enumerate(HTTP_CASES, len(CASES) + 1):
        rows.append(f'| {i} | {area} | `{cid}`: {what} | HTTP {status}, `{{"detail": "...{fragment}..."}}` |')
    return "\n".join(rows)


CATALOGUE_DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-input.md"


def write_catalogue_doc() -> None:
    """Replace the table at the end of docs/bad-input.md (everything from its header row) with the current one."""
    text = CATALOGUE_DOC.read_text()
    CATALOGUE_DOC.write_text(text[: text.index("| # | area |")] + catalogue_markdown() + "\n")


def test_docs_table_is_current() -> None:
    assert catalogue_markdown() in CATALOGUE_DOC.read_text(), (
        "regenerate docs/bad-input.md: python -m tests.test_bad_input"
    )


if __name__ == "__main__":
    write_catalogue_doc()
    print(f"wrote {CATALOGUE_DOC}")
