"""hf: models (Hugging Face image classifiers, cifar_cnn.models.hf) checked against transformers itself: loading from
a folder, a relative folder and the hub cache; features and kept heads equal to transformers' own forward; the
model's preprocessing in checkpoints unless the user overrides it; the whole life of a run (train, exact resume,
evaluate, ONNX export, predict, serve) with the model's files gone; every recipe; upscaled batches; one-line errors.

The models are tiny ResNet and ConvNeXt networks with random (seeded) weights, saved with save_pretrained once per
session, beside a distinctive preprocessor_config.json and a copy in huggingface_hub's cache layout."""

from __future__ import annotations

import json
import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cifar_cnn import evaluate_checkpoint, load_checkpoint, resolve_config, train
from cifar_cnn.cli import main
from cifar_cnn.models import create_model, model_info
from cifar_cnn.recipes import RECIPES

from .conftest import CLASSES, make_images, run_cli, write_official_batches
from .helpers import quiet
from .model_fixtures import Server

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

MEAN = [0.5, 0.4, 0.3]  # the preprocessor's statistics: unlike CIFAR-10's, ImageNet's and the seed recipe's
STD = [0.2, 0.25, 0.3]
OWN_LABELS = ["apple", "pear", "plum"]  # the tiny models' id2label (not transformers' default LABEL_i)
SHA = "0123456789abcdef0123456789abcdef01234567"  # the hub cache's snapshot of org/tiny
QUICK = ["--device", "cpu", "--precision", "fp32", "--no-report", "--no-progress", "--threads", "1"]


def _tiny_model(family: str) -> torch.nn.Module:
    labels = {"id2label": dict(enumerate(OWN_LABELS)), "label2id": {c: i for i, c in enumerate(OWN_LABELS)}}
    if family == "resnet":
        config = transformers.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", **labels
        )
    else:
        config = transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, **labels)
    return transformers.AutoModelForImageClassification.from_config(config)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders 'resnet' and 'convnext' (save_pretrained + preprocessor_config.json), 'cache' (a huggingface_hub
    cache holding the ResNet as org/tiny) and 'data' (200 train and 50 test images of 10 classes, 32 px)."""
    root = tmp_path_factory.mktemp("hf")
    out: dict[str, Path] = {}
    with torch.random.fork_rng():
        torch.manual_seed(1234)  # not a run's seed (0): a run from scratch would draw these very weights
        for family in ("resnet", "convnext"):
            folder = root / family
            model = _tiny_model(family)
            model.save_pretrained(folder)
            pre = {"image_mean": MEAN, "image_std": STD, "size": {"shortest_edge": 32}}
            (folder / "preprocessor_config.json").write_text(json.dumps(pre))
            out[family] = folder
    repo = root / "cache" / "models--org--tiny"
    shutil.copytree(out["resnet"], repo / "snapshots" / SHA)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SHA)
    out["cache"] = root / "cache"
    x, y = make_images(20, seed=1)
    tx, ty = make_images(5, seed=2)
    out["data"] = write_official_batches(root / "cifar-10-batches-py", x, y, tx, ty)
    return out


def folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The weights in a save_pretrained folder, read with safetensors (not through transformers or cifar-cnn)."""
    return safetensors_torch.load_file(str(folder / "model.safetensors"))


def body_of(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The weights of everything but the classifier head, keys without `prefix`."""
    return {k[len(prefix) :]: v for k, v in state.items() if not k[len(prefix) :].startswith("classifier")}


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Equal keys and tensors, batch norm's step counters (num_batches_tracked: not weights) left out."""
    got, want = ({k: v for k, v in d.items() if not k.endswith("num_batches_tracked")} for d in (got, want))
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def normalized(images: np.ndarray, mean: list[float], std: list[float]) -> torch.Tensor:
    """x / 255, (x - mean) / std in float64, rounded once to float32."""
    x = images.astype(np.float64) / 255.0
    x = (x - np.array(mean).reshape(1, 3, 1, 1)) / np.array(std).reshape(1, 3, 1, 1)
    return torch.from_numpy(x.astype(np.float32))


def read_test_split(data: Path) -> tuple[np.ndarray, np.ndarray]:
    """The test split of an official-format folder, read with pickle (not through cifar-cnn's loaders)."""
    batch = pickle.loads((data / "test_batch").read_bytes(), encoding="bytes")
    return np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(batch[b"labels"])


def file_order(result: Any, images: np.ndarray, labels: np.ndarray) -> list[int]:
    """Where each image of an evaluation (`with_logits`: its images, in its order) stands in the file, after checking
    that they are the file's images with the file's labels."""
    where = {img.tobytes(): i for i, img in enumerate(images)}
    order = [where[np.ascontiguousarray(img).tobytes()] for img in result.images]
    assert sorted(order) == list(range(len(images))) and np.array_equal(result.labels, labels[order])
    return order


def transformers_net(ckpt: dict) -> torch.nn.Module:
    """A checkpoint's network built by transformers alone from its recorded config, with its weights."""
    record = ckpt["model"]["hf"]["config"]
    config = transformers.CONFIG_MAPPING[record["model_type"]].from_dict(record)
    net = transformers.AutoModelForImageClassification.from_config(config)
    net.load_state_dict({k.removeprefix("net."): v for k, v in ckpt["model_state"].items()})
    return net.eval()


def forget_files(folder: Path) -> None:
    """Delete a model folder, so that what follows runs from the checkpoint alone (hf.locate reads a folder each time
    it is named; only hub ids are remembered for the life of a process)."""
    shutil.rmtree(folder)


def train_cli(data: Path, model: str, out: Path, *options: str) -> int:
    return main(["train", "--data", str(data), "--model", model, "--out", str(out), *QUICK, *options])


# ---------------------------------------------------------------------------------------------------------------
# 1. Loading


def test_absolute_and_relative_folders_load_the_folders_weights(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    folder = shutil.copytree(tiny["resnet"], tmp_path / "models" / "tiny-resnet")
    want = body_of(folder_weights(folder))
    absolute = create_model(f"hf:{folder}", 10, classes=CLASSES, pretrained=True)
    assert_same_weights(body_of(absolute.state_dict(), "net."), want)
    assert absolute.net.classifier[-1].weight.shape == (10, 16)  # a new head for the data's 10 classes
    assert absolute.hf_record["source"] == str(folder) and absolute.hf_record["pretrained"] is True

    monkeypatch.chdir(tmp_path)
    relative = create_model("hf:models/tiny-resnet", 10, classes=CLASSES, pretrained=True)
    assert_same_weights(body_of(relative.state_dict(), "net."), want)
    assert relative.hf_record["source"] == str(folder)


def test_a_relative_folder_is_found_from_the_current_directory(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The same relative name in two directories names two models (a notebook that changes directory)."""
    for where, family in (("a", "resnet"), ("b", "convnext")):
        shutil.copytree(tiny[family], tmp_path / where / "tiny")
    monkeypatch.chdir(tmp_path / "a")
    assert create_model("hf:tiny", 10, classes=CLASSES).hf_record["config"]["model_type"] == "resnet"
    monkeypatch.chdir(tmp_path / "b")
    assert create_model("hf:tiny", 10, classes=CLASSES).hf_record["config"]["model_type"] == "convnext"


def test_hub_id_from_the_offline_cache_trains_from_the_cached_weights(tiny: dict[str, Path], tmp_path: Path):
    """hf:org/tiny with HF_HUB_OFFLINE=1 and HF_HUB_CACHE (read when huggingface_hub is imported: a subprocess). The
    body is frozen (no gradients, in eval mode), so best.pt's body must be exactly the cached weights, running
    statistics too."""
    out = tmp_path / "run"
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tiny["cache"])}
    r = run_cli(
        "train", "--data", str(tiny["data"]), "--model", "hf:org/tiny", "--out", str(out), *QUICK,
        "--epochs", "1", "--batch-size", "32", "--freeze-backbone", env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["model"]["name"] == "hf:org/tiny" and ckpt["model"]["hf"]["source"] == "org/tiny"
    assert ckpt["mean"] == pytest.approx(MEAN) and ckpt["std"] == pytest.approx(STD) and ckpt["input_size"] == 32
    cached = tiny["cache"] / "models--org--tiny" / "snapshots" / SHA
    assert_same_weights(body_of(ckpt["model_state"], "net."), body_of(folder_weights(cached)))
    head = folder_weights(cached)["classifier.1.weight"]
    assert ckpt["model_state"]["net.classifier.1.weight"].shape == (10, head.shape[1])


# ---------------------------------------------------------------------------------------------------------------
# 2. Features and heads against transformers' own forward


@pytest.mark.parametrize("family", ["resnet", "convnext"])
def test_features_and_kept_head_equal_transformers_forward(tiny: dict[str, Path], family: str):
    folder = tiny[family]
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        pooled = transformers.AutoModel.from_pretrained(folder).eval()(pixel_values=x).pooler_output.flatten(1)
        logits = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()(pixel_values=x).logits

        new_head = create_model(f"hf:{folder}", 10, classes=CLASSES, pretrained=True).eval()
        torch.testing.assert_close(new_head.features(x), pooled, rtol=0, atol=1e-6)
        assert new_head(x).shape == (4, 10) and new_head.hf_record["head_kept"] is False

        # the model's own labels, in its order: its own head, so its own logits
        own = create_model(f"hf:{folder}", 3, classes=OWN_LABELS, pretrained=True).eval()
        assert own.hf_record["head_kept"] is True
        torch.testing.assert_close(own.features(x), pooled, rtol=0, atol=1e-6)
        torch.testing.assert_close(own(x), logits, rtol=0, atol=1e-6)

        # the same names in another order are other classes: a new head (whose logits are not the model's)
        reordered = create_model(f"hf:{folder}", 3, classes=OWN_LABELS[::-1], pretrained=True).eval()
        assert reordered.hf_record["head_kept"] is False
        torch.testing.assert_close(reordered.features(x), pooled, rtol=0, atol=1e-6)
        assert not torch.allclose(reordered(x), logits, atol=1e-3)


def test_input_size_and_statistics_come_from_the_files(tiny: dict[str, Path], tmp_path: Path):
    info = model_info(f"hf:{tiny['resnet']}")
    assert (info.input_size, info.mean, info.std, info.any_input_size) == (32, tuple(MEAN), tuple(STD), True)
    bare = shutil.copytree(tiny["resnet"], tmp_path / "bare")
    (bare / "preprocessor_config.json").unlink()  # transformers' defaults: ImageNet statistics, 224 px
    info = model_info(f"hf:{bare}")
    assert (info.input_size, info.mean, info.std) == (224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


# ---------------------------------------------------------------------------------------------------------------
# 3. Preprocessing: the model's own unless the user sets it (every recipe keeps it: see test_every_recipe_...)


def test_mean_and_std_on_the_command_line_or_in_a_config_file_override_the_models(
    tiny: dict[str, Path], tmp_path: Path
):
    model = f"hf:{tiny['resnet']}"
    flags = tmp_path / "flags"
    options = ["--epochs", "1", "--batch-size", "32"]
    assert train_cli(tiny["data"], model, flags, *options, "--mean", "0.1", "0.2", "0.3", "--std", "1", "2", "3") == 0
    ckpt = load_checkpoint(flags / "best.pt")
    assert (ckpt["mean"], ckpt["std"], ckpt["input_size"]) == ([0.1, 0.2, 0.3], [1.0, 2.0, 3.0], 32)

    config = tmp_path / "cfg.yaml"
    config.write_text("mean: [0.6, 0.5, 0.4]\nstd: [0.3, 0.3, 0.3]\nimage_size: 40\n")
    from_file = tmp_path / "file"
    assert train_cli(tiny["data"], model, from_file, *options, "--config", str(config)) == 0
    ckpt = load_checkpoint(from_file / "best.pt")
    assert (ckpt["mean"], ckpt["std"], ckpt["input_size"]) == ([0.6, 0.5, 0.4], [0.3, 0.3, 0.3], 40)


# ---------------------------------------------------------------------------------------------------------------
# 4. The life of a run, with the model's files deleted after training


def _png_files(images: np.ndarray, folder: Path) -> list[Path]:
    folder.mkdir()
    paths = []
    for i, img in enumerate(images):
        paths.append(folder / f"{i}.png")
        Image.fromarray(img.transpose(1, 2, 0)).save(paths[-1])
    return paths


@pytest.mark.parametrize("family", ["resnet", "convnext"])
def test_train_resume_evaluate_export_predict_serve_without_the_model_files(
    tiny: dict[str, Path], family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    folder = shutil.copytree(tiny[family], tmp_path / "model")
    data = tiny["data"]
    overrides = dict(model=f"hf:{folder}", epochs=2, batch_size=16, lr=0.01, momentum=0.9, flip=True, translate=2)
    config = resolve_config(None, None, {**overrides, "device": "cpu", "precision": "fp32"})
    straight, part = tmp_path / "straight", tmp_path / "part"
    train(config, str(data), straight, log=quiet, threads=1)
    calls = {"n": 0}

    def stop_inside_epoch_2() -> bool:  # polled after every step (10 an epoch) and after each epoch
        calls["n"] += 1
        return calls["n"] >= 15

    assert train(config, str(data), part, log=quiet, threads=1, should_stop=stop_inside_epoch_2)["interrupted"]
    stopped = load_checkpoint(part / "last.pt")
    assert stopped["epoch"] == 1 and 0 < stopped["batch_in_epoch"] < 10

    forget_files(folder)
    best = straight / "best.pt"
    # serve: a fresh process, which never saw the model's files; it boots while the rest runs
    with ThreadPoolExecutor(1) as pool:
        booting = pool.submit(Server, best, tmp_path / "serve.log", "--threads", "1", "--log-level", "warning")
        try:
            train(config, None, part, resume=part / "last.pt", log=quiet, threads=1)  # the data: as recorded
            a, b = load_checkpoint(straight / "last.pt"), load_checkpoint(part / "last.pt")
            assert a["model_state"].keys() == b["model_state"].keys()
            for k in a["model_state"]:
                assert torch.equal(a["model_state"][k], b["model_state"][k]), k

            files, predicted = _evaluate_export_predict(best, data, tmp_path, capsys)
            server = booting.result()
            for f, want in zip(files, predicted):
                r = httpx.post(f"{server.url}/predict", files={"file": (f.name, f.read_bytes())}, timeout=60)
                assert r.status_code == 200, r.text
                assert r.json()["label"] == want["label"]
        finally:
            if booting.exception() is None:  # (waits for the boot; a server that fails to boot has stopped itself)
                booting.result().stop()


def _evaluate_export_predict(
    best: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> tuple[list[Path], list[dict]]:
    """Evaluate, export to ONNX and predict `best` (against transformers' forward of its weights); returns the
    image files predicted and the predictions."""
    ckpt = load_checkpoint(best)
    images, labels = read_test_split(data)
    with torch.no_grad():
        reference = transformers_net(ckpt)(pixel_values=normalized(images, MEAN, STD)).logits
    result = evaluate_checkpoint(best, device="cpu", precision="fp32", log=quiet, with_logits=True)
    torch.testing.assert_close(result.logits, reference[file_order(result, images, labels)], rtol=0, atol=1e-5)
    assert result["accuracy"] == pytest.approx(float((reference.argmax(1).numpy() == labels).mean()))
    assert result["accuracy"] == pytest.approx(json.loads((best.parent / "test_metrics.json").read_text())["accuracy"])

    # ONNX: the exporter's own parity check, and the file run by onnxruntime against the reference
    onnx_file = tmp_path / "model.onnx"
    assert main(["export", str(best), "--format", "onnx", "--out", str(onnx_file), "--threads", "1"]) == 0
    described = json.loads(Path(f"{onnx_file}.json").read_text())
    assert described["parity_ok"] and described["parity"]["num_images"] == 50
    assert described["mean"] == pytest.approx(MEAN) and described["std"] == pytest.approx(STD)
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": normalized(images, MEAN, STD).numpy()})[0]
    np.testing.assert_allclose(got, reference.numpy(), rtol=0, atol=1e-4)

    # predict on image files: the reference's top class
    files = _png_files(images[:6], tmp_path / "photos")
    capsys.readouterr()
    assert main(["predict", str(best), *map(str, files), "--json", "--threads", "1"]) == 0
    predicted = json.loads(capsys.readouterr().out)["predictions"]
    assert [p["label"] for p in predicted] == [ckpt["classes"][i] for i in reference[:6].argmax(1)]
    return files, predicted


# ---------------------------------------------------------------------------------------------------------------
# 5. --no-pretrained


def test_no_pretrained_starts_from_scratch_and_resumes_without_the_files(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    folder = shutil.copytree(tiny["resnet"], tmp_path / "model")
    out = tmp_path / "run"
    # lr 1e-9: the weights stay where they started, so pretrained ones would still equal the folder's to ~1e-8
    options = ["--epochs", "1", "--batch-size", "32", "--lr", "1e-9", "--momentum", "0", "--no-pretrained"]
    assert train_cli(tiny["data"], f"hf:{folder}", out, *options) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["pretrained"] is False
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["model"]["hf"]["pretrained"] is False
    got, want = body_of(ckpt["model_state"], "net."), body_of(folder_weights(folder))
    convs = [k for k in want if k.endswith("convolution.weight")]
    assert len(convs) >= 4 and all(not torch.allclose(got[k], want[k], atol=1e-3) for k in convs)

    forget_files(folder)
    assert main(["train", "--resume", str(out / "last.pt"), "--epochs", "2", *QUICK]) == 0
    resumed = load_checkpoint(out / "last.pt")
    assert resumed["epoch"] == 2 and resumed["config"]["pretrained"] is False
    assert yaml.safe_load((out / "config.yaml").read_text())["epochs"] == 2


# ---------------------------------------------------------------------------------------------------------------
# 6. Every recipe, and no validation split


@pytest.mark.parametrize(
    "recipe, options", [(name, []) for name in RECIPES] + [("seed", ["--val-split", "0"])], ids=lambda v: str(v)
)
def test_every_recipe_trains_an_hf_model_with_its_own_preprocessing(
    tiny: dict[str, Path], tmp_path: Path, recipe: str, options: list[str]
):
    out = tmp_path / "run"
    quick = ["--epochs", "1", "--batch-size", "16", "--eval-batch-size", "64"]
    assert train_cli(tiny["data"], f"hf:{tiny['resnet']}", out, "--recipe", recipe, *quick, *options) == 0
    best = load_checkpoint(out / "best.pt")
    # a recipe's mean/std (CIFAR-10's, or 0.5) and image size are for networks trained from scratch
    assert (best["mean"], best["std"], best["input_size"]) == (MEAN, STD, 32)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["recipe"] == recipe and saved["model"] == f"hf:{tiny['resnet']}"
    val_split = 0.0 if options else RECIPES[recipe].values["val_split"]
    assert saved["val_split"] == val_split
    if val_split == 0:
        assert "final weights" in best["note"]
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert metrics["num_images"] == 50 and 0 <= metrics["accuracy"] <= 1


# ---------------------------------------------------------------------------------------------------------------
# 7. 32 px data for a 64 px input: held at 32 px, batches upscaled


def test_small_images_are_upscaled_a_batch_at_a_time(
    tiny: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
):
    out = tmp_path / "run"
    assert train_cli(tiny["data"], f"hf:{tiny['resnet']}", out, "--epochs", "1", "--image-size", "64") == 0
    assert "images are 32 px: held at that size, batches upscaled to 64 px" in capsys.readouterr().out
    best = out / "best.pt"
    ckpt = load_checkpoint(best)
    assert ckpt["input_size"] == 64
    images, labels = read_test_split(tiny["data"])
    x = torch.nn.functional.interpolate(
        normalized(images, MEAN, STD), size=(64, 64), mode="bilinear", align_corners=False
    )
    with torch.no_grad():
        reference = transformers_net(ckpt)(pixel_values=x).logits
    result = evaluate_checkpoint(best, device="cpu", precision="fp32", log=quiet, with_logits=True)
    torch.testing.assert_close(result.logits, reference[file_order(result, images, labels)], rtol=0, atol=1e-5)
    with torch.no_grad():  # and not what the model gives the 32 px images themselves
        small = transformers_net(ckpt)(pixel_values=normalized(images, MEAN, STD)).logits
    assert not torch.allclose(small, reference, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# 8. One-line errors


def _config_folder(root: Path, config: dict | None) -> Path:
    """A folder with `config` as its config.json (None: an empty folder)."""
    root.mkdir()
    if config is not None:
        (root / "config.json").write_text(json.dumps(config))
    return root


def assert_one_line(rc: int, stderr: str, expected: list[str]) -> None:
    assert rc == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cifar-cnn: error: --model hf:"), stderr
    for text in expected:
        assert text in lines[0]


@pytest.mark.parametrize("case", ["no-config", "bert", "remote-code"])
def test_folders_that_hold_no_usable_model_are_refused_in_one_line(
    tiny: dict[str, Path], tmp_path: Path, case: str, capsys: pytest.CaptureFixture
):
    resnet_config = json.loads((tiny["resnet"] / "config.json").read_text())
    folder, expected = {
        "no-config": (_config_folder(tmp_path / "empty", None), ["no config.json", "save_pretrained"]),
        "bert": (_config_folder(tmp_path / "bert", {"model_type": "bert"}), ["'bert'", "not an image classifier"]),
        "remote-code": (
            _config_folder(tmp_path / "remote", {**resnet_config, "auto_map": {"A": "b.C"}}),
            ["trust_remote_code", "never runs"],
        ),
    }[case]
    out = tmp_path / "run"
    capsys.readouterr()
    assert_one_line(train_cli(tiny["data"], f"hf:{folder}", out), capsys.readouterr().err, expected)
    assert not out.exists()


@pytest.mark.parametrize("case", ["missing-hub", "no-transformers"])
def test_a_model_not_in_the_offline_cache_or_no_transformers_is_one_line(
    tiny: dict[str, Path], tmp_path: Path, case: str
):
    """In a subprocess: HF_HUB_CACHE is read when huggingface_hub is imported, and `import transformers` must fail
    (a sitecustomize.py that blocks it) in an interpreter of its own."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tiny["cache"])}
    if case == "missing-hub":
        model, expected = "hf:org/missing", ["not in the Hugging Face cache", str(tiny["cache"]), "hf:PATH"]
    else:
        site = tmp_path / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text("import sys\n\nsys.modules['transformers'] = None\n")
        env["PYTHONPATH"] = str(site)
        model, expected = f"hf:{tiny['resnet']}", ["cifar-cnn[pretrained]"]
    out = tmp_path / "run"
    r = run_cli("train", "--data", str(tiny["data"]), "--model", model, "--out", str(out), *QUICK, env=env)
    assert_one_line(r.returncode, r.stderr, expected)
    assert "Traceback" not in r.stdout + r.stderr and not out.exists()
