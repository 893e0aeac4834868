"""Transfer that helps: a small Hugging Face ResNet trained by cifar-cnn on five CIFAR-10 classes and saved with
`save_pretrained`, then fine-tuned on the five other classes from 50 images each, beats the same network trained from
scratch (`--no-pretrained`) with the same seed, epochs, batch, optimizer and LR by at least 3 points of test
accuracy. Real images from the shared archive; every layer trains from the first epoch in both runs.

Margins measured by hand (30 Nov, 2 shared cores), pretrained vs scratch on the 1,000 test images, seeds 0-3:
69.4 vs 61.9, 71.0 vs 64.3, 70.5 vs 61.8, 69.3 vs 61.0 (+7.5, +6.7, +8.7, +8.3 points).
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from .conftest import CLASSES, SHARED_ARCHIVE

PRETRAIN_CLASSES = CLASSES[:5]  # airplane, automobile, bird, cat, deer
FINETUNE_CLASSES = CLASSES[5:]  # dog, frog, horse, ship, truck
PRETRAIN_PER_CLASS = 2000  # 10,000 images x 4 epochs: most of the test's time; 1,000 x 8 gave margins of 4.6-9.2
PRETRAIN_TEST_PER_CLASS = 20  # only to show that pretraining learned something
FINETUNE_PER_CLASS = 50
FINETUNE_TEST_PER_CLASS = 200  # 1,000 test images: a standard error of about 1.5 points per accuracy
SEED = 0
MARGIN = 0.03

# What both fine-tuning runs share; only `pretrained` differs. No freezing: all layers train from the first step.
FINETUNE = dict(
    epochs=15,
    batch_size=50,
    optimizer="sgd",
    lr=0.05,
    momentum=0.9,
    nesterov=True,
    weight_decay=5e-4,
    schedule="cosine",
    flip=True,
    translate=2,
    val_split=0.0,  # best.pt = the final weights, so the test scores what the schedule ends with
    freeze_backbone=False,
    freeze_epochs=0,
    seed=SEED,
    device="cpu",
    precision="fp32",
)
PRETRAIN = {**FINETUNE, "epochs": 4, "lr": 0.1, "warmup_epochs": 0.5, "normalize": "dataset"}


def extract_trees(root: Path) -> tuple[Path, Path]:
    """Two image-folder trees from one streaming pass over the shared archive: root/pretrain (the first five classes)
    and root/finetune (the other five), each train/<class>/NNNN.jpg + test/<class>/NNNN.jpg with the first images."""
    wanted = {c: (PRETRAIN_PER_CLASS, PRETRAIN_TEST_PER_CLASS, "pretrain") for c in PRETRAIN_CLASSES}
    wanted |= {c: (FINETUNE_PER_CLASS, FINETUNE_TEST_PER_CLASS, "finetune") for c in FINETUNE_CLASSES}
    with tarfile.open(SHARED_ARCHIVE, "r|gz") as tf:
        for member in tf:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[1] not in wanted:
                continue
            n_train, n_test, tree = wanted[parts[1]]
            if int(Path(parts[2]).stem) < (n_train if parts[0] == "train" else n_test):
                dest = root / tree / member.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(tf.extractfile(member).read())
    return root / "pretrain", root / "finetune"


def save_folder(net: Any, folder: Path, mean: list[float] | None = None, std: list[float] | None = None) -> Path:
    """`net` saved with save_pretrained, with a preprocessor_config.json: 32 px and, if given, the mean/std."""
    net.save_pretrained(folder)
    pre: dict[str, Any] = {"size": 32}
    if mean is not None:
        pre |= {"image_mean": mean, "image_std": std}
    (folder / "preprocessor_config.json").write_text(json.dumps(pre))
    return folder


def run(config: dict[str, Any], data: Path, out: Path, home: Path) -> Any:
    """A cifar-cnn training in this process, on one thread (the same float reductions on any machine)."""
    from cifar_cnn import resolve_config, train

    return train(resolve_config(None, None, config), str(data), out, home=home, log=lambda _m: None, threads=1)


def test_pretrained_beats_scratch_on_new_classes(tmp_path: Path, data_home: Path) -> None:
    if not SHARED_ARCHIVE.is_file():
        pytest.fail(f"the shared data archive is missing: {SHARED_ARCHIVE}")
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.disable_progress_bar()
    from cifar_cnn import load_checkpoint, model_from_checkpoint

    pretrain_data, finetune_data = extract_trees(tmp_path / "data")
    # A ResNet of transformers (the stem halves 32 px twice: stages at 8, 4 and 2 px), about 80k parameters.
    config = transformers.ResNetConfig(
        embedding_size=16, hidden_sizes=[16, 32, 64], depths=[1, 1, 1], layer_type="basic", num_labels=5
    )
    initial = save_folder(transformers.ResNetForImageClassification(config), tmp_path / "resnet-init")

    # 1. pretraining through cifar-cnn, from scratch, on the first five classes; its best.pt saved as an hf folder
    source = run(
        {**PRETRAIN, "model": f"hf:{initial}", "pretrained": False}, pretrain_data, tmp_path / "pretrain", data_home
    )
    assert source.test.metrics["classes"] == PRETRAIN_CLASSES
    assert source.test.accuracy > 0.5, f"pretraining learned too little: {source.test.accuracy:.3f} (chance 0.2)"
    ckpt = load_checkpoint(tmp_path / "pretrain" / "best.pt")
    pretrained = save_folder(model_from_checkpoint(ckpt).net, tmp_path / "resnet-pretrained", ckpt["mean"], ckpt["std"])

    # 2. the same architecture on the five other classes: from those weights, and from scratch
    accuracy = {}
    for from_weights in (True, False):
        out = tmp_path / ("finetune" if from_weights else "scratch")
        config = {**FINETUNE, "model": f"hf:{pretrained}", "pretrained": from_weights}
        result = run(config, finetune_data, out, data_home)
        record = load_checkpoint(out / "best.pt")["model"]["hf"]
        assert record["pretrained"] is from_weights and record["head_kept"] is False  # new classes: a new head
        assert result.history[-1]["epoch"] == FINETUNE["epochs"]
        assert result.test.metrics["classes"] == FINETUNE_CLASSES
        assert result.test.metrics["num_images"] == 5 * FINETUNE_TEST_PER_CLASS
        accuracy[from_weights] = result.test.accuracy

    margin = accuracy[True] - accuracy[False]
    assert margin >= MARGIN, (
        f"pretrained {100 * accuracy[True]:.1f}% vs scratch {100 * accuracy[False]:.1f}% on "
        f"{5 * FINETUNE_TEST_PER_CLASS} test images: {100 * margin:+.1f} points, expected >= {100 * MARGIN:.0f}"
    )
