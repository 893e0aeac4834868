"""Explanations: each method against an independent reference on models whose answer is known in closed form, the
layer Grad-CAM picks for every registered model and for hf: backbones, the deletion and randomization tests on a
small trained model (and their failure on maps of noise), and `cifar-cnn explain` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from torch import nn

from cifar_cnn import resolve_config, train
from cifar_cnn.cli import main
from cifar_cnn.explain import (
    DeletionBaselines,
    Explainer,
    centre_map,
    deletion_test,
    gradcam_layer,
    in_blocks,
    random_maps,
    randomization_check,
    rank_correlation,
    surrogate_maps,
    top_mask,
)
from cifar_cnn.models import create_model, list_models
from cifar_cnn.predict import Predictor

from .conftest import write_official_batches

COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]])
PATCH = 8


def patch_images(per_class: int, seed: int, size: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grey-noise images whose class is told only by a coloured 8 x 8 square at a random place: (images, labels,
    masks of the squares). A model that learns the task must look at the square, so a faithful map points there."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(COLOURS)), per_class)
    rng.shuffle(labels)
    images = rng.integers(60, 196, size=(len(labels), 3, size, size)).astype(np.uint8)
    masks = np.zeros((len(labels), size, size), dtype=bool)
    for i, c in enumerate(labels):
        y, x = rng.integers(0, size - PATCH, 2)
        images[i, :, y : y + PATCH, x : x + PATCH] = COLOURS[c][:, None, None]
        masks[i, y : y + PATCH, x : x + PATCH] = True
    return images, labels.astype(np.int64), masks


@pytest.fixture(scope="module")
def patch_model(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """seed_cnn trained 4 epochs on 600 patch images (about 8 s); its 120 test images with their squares."""
    root = tmp_path_factory.mktemp("patch-model")
    x, y, _ = patch_images(150, seed=1)
    tx, ty, tmask = patch_images(30, seed=2)
    data = write_official_batches(root / "cifar-10-batches-py", x, y, tx, ty, classes=["r", "g", "b", "y"])
    config = resolve_config(
        "seed", None, dict(epochs=4, batch_size=32, lr=0.05, device="cpu", precision="fp32", val_split=0.2)
    )
    train(config, str(data), root / "run", home=root / "home", log=lambda m: None, threads=1)
    return {"checkpoint": root / "run" / "best.pt", "images": tx, "labels": ty, "masks": tmask, "data": data}


@pytest.fixture(scope="module")
def explainer(patch_model: dict) -> Explainer:
    return Explainer.from_checkpoint(patch_model["checkpoint"], threads=1)


def identity_stats_predictor(model: nn.Module, size: int = 8) -> Predictor:
    """A predictor whose normalization is x / 255 (mean 0, std 1), so gradients are easy to write down."""
    return Predictor(model.eval(), ["a", "b"], (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), size)


# --------------------------------------------------------------------------------------------------- references


def test_saliency_and_integrated_gradients_of_a_linear_model_are_known_in_closed_form() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    ex = Explainer(identity_stats_predictor(model))
    images = np.random.default_rng(0).integers(0, 256, (3, 3, 8, 8), dtype=np.uint8)
    w = model[1].weight.detach().numpy().reshape(2, 3, 8, 8)
    targets = np.array([0, 1, 1])

    got = ex.maps(images, "saliency", targets)
    want = np.abs(w[targets]).max(1)  # d logit / d x = w, the largest over channels
    assert np.allclose(got, want / want.max(axis=(1, 2), keepdims=True), atol=1e-6)

    got = ex.maps(images, "integrated-gradients", targets)
    x = images / 255.0
    want = np.maximum(((x - 128 / 255.0) * w[targets]).sum(1), 0)  # exact for a linear model: (x - x0) * w, kept > 0
    assert (((x - 128 / 255.0) * w[targets]).sum(1) < 0).mean() > 0.2  # so the sign matters here
    assert np.allclose(got, want / want.max(axis=(1, 2), keepdims=True), atol=1e-5)


class TinyCam(nn.Module):
    """conv 1x1 -> global average pool -> linear: Grad-CAM equals the class activation map (Zhou et al., 2016)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 4, 1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def test_gradcam_of_a_global_average_pool_network_is_its_class_activation_map() -> None:
    torch.manual_seed(1)
    model = TinyCam()
    ex = Explainer(identity_stats_predictor(model))
    assert ex.layer() == "features"
    images = np.random.default_rng(1).integers(0, 256, (4, 3, 8, 8), dtype=np.uint8)
    targets = np.array([0, 1, 0, 1])
    with torch.no_grad():
        a = model.features(torch.from_numpy(images / 255.0).float()).numpy()  # N, 4, 8, 8
    cam = np.maximum(np.einsum("nk,nkhw->nhw", model.head.weight.detach().numpy()[targets], a), 0)
    want = cam / np.maximum(cam.max(axis=(1, 2), keepdims=True), 1e-12)
    assert np.allclose(ex.maps(images, "gradcam", targets), want, atol=1e-5)


def test_rank_correlation_is_spearmans_rho() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random((3, 5, 5)), rng.random((3, 5, 5))
    ra = a.reshape(3, -1).argsort(1).argsort(1)
    rb = b.reshape(3, -1).argsort(1).argsort(1)
    n = 25
    want = 1 - 6 * ((ra - rb) ** 2).sum(1) / (n * (n * n - 1))  # the textbook formula (no ties)
    assert np.allclose(rank_correlation(a, b), want)
    assert np.allclose(rank_correlation(a, a), 1) and np.allclose(rank_correlation(a, -a), -1)
    ties = np.array([[[1.0, 1.0], [2.0, 3.0]]])
    assert np.isclose(rank_correlation(ties, np.array([[[1.0, 2.0], [3.0, 4.0]]]))[0], 0.9486833)  # by hand
    assert rank_correlation(np.zeros((1, 2, 2)), a[:1, :2, :2])[0] == 0.0


def test_top_mask_greys_the_highest_ranked_fifth() -> None:
    m = np.arange(100, dtype=np.float32).reshape(1, 10, 10)
    mask = top_mask(m, 0.2)
    assert mask.sum() == 20 and mask[0].ravel()[80:].all() and not mask[0].ravel()[:80].any()
    # a sparse map (16 hot pixels, the rest 0, as a ReLU leaves it): the hot ones, then ties drawn at random, not a
    # band of the first rows
    sparse = np.zeros((1, 32, 32), np.float32)
    sparse[0, 20:24, 20:24] = 1.0
    mask = top_mask(sparse)
    assert mask.sum() == 205 and mask[0, 20:24, 20:24].all()
    rows = mask[0].sum(1)
    assert rows[:6].sum() < 80 and (rows[16:] > 0).sum() >= 12  # spread over the image
    assert np.array_equal(mask, top_mask(sparse)) and not np.array_equal(mask, top_mask(sparse, seed=1))
    c = centre_map(32)
    assert c.argmax() in (15 * 32 + 15, 15 * 32 + 16, 16 * 32 + 15, 16 * 32 + 16) and c.min() < 0.2 * c.max()


# --------------------------------------------------------------------------------------------------- the layer


@pytest.mark.parametrize("name", list_models())
def test_gradcam_finds_the_last_spatial_map_of_every_registered_model(name: str) -> None:
    model = create_model(name, num_classes=10).eval()
    layer = gradcam_layer(model, 32)
    expected = {"seed_cnn": "pool", "airbench": "groups.2", "resnet18": "layers"}
    assert layer == expected[name]
    ex = Explainer(Predictor(model, [str(i) for i in range(10)], (0.5,) * 3, (0.25,) * 3, 32))
    maps = ex.maps(np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8), "gradcam")
    assert maps.shape == (2, 32, 32) and maps.dtype == np.float32 and maps.min() >= 0 and maps.max() <= 1


def _hf_folder(tmp_path: Path, config: transformers.PretrainedConfig) -> Path:
    folder = tmp_path / config.model_type
    transformers.AutoModelForImageClassification.from_config(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"size": {"height": 32, "width": 32}}))
    return folder


def test_gradcam_layer_of_hf_backbones(tmp_path: Path) -> None:
    labels = {"id2label": {0: "x", 1: "y"}, "label2id": {"x": 0, "y": 1}}
    resnet = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], **labels)
    convnext = transformers.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, **labels)
    images = np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    for config, layer in ((resnet, "net.resnet.encoder.stages.1"), (convnext, "net.convnext.encoder.stages.1")):
        model = create_model(f"hf:{_hf_folder(tmp_path, config)}", 2, classes=["x", "y"]).eval()
        assert gradcam_layer(model, 32) == layer
        ex = Explainer(Predictor(model, ["x", "y"], (0.5,) * 3, (0.5,) * 3, 32))
        assert ex.maps(images, "gradcam").shape == (2, 32, 32)
    vit = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        **labels,
    )
    model = create_model(f"hf:{_hf_folder(tmp_path, vit)}", 2, classes=["x", "y"]).eval()
    # a vision transformer's only spatial map is its patch embedding (its blocks work on tokens)
    assert gradcam_layer(model, 32) == "net.vit.embeddings.patch_embeddings.projection"


def test_a_model_without_a_spatial_map_gets_gradient_methods_only() -> None:
    ex = Explainer(identity_stats_predictor(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))))
    images = np.zeros((1, 3, 8, 8), dtype=np.uint8)
    with pytest.raises(Exception, match="no spatial feature map"):
        ex.maps(images, "gradcam")
    assert ex.maps(images, "saliency").shape == (1, 8, 8)  # gradient methods need no feature map


def test_a_named_layer_is_checked(explainer: Explainer) -> None:
    predictor = explainer.predictor
    assert Explainer(predictor, layer="conv1").layer() == "conv1"
    with pytest.raises(Exception, match="no such module"):
        Explainer(predictor, layer="conv9")
    with pytest.raises(Exception, match="does not output a spatial feature map"):
        Explainer(predictor, layer="fc1")


# --------------------------------------------------------------------------------------------------- faithfulness


def noise_maps(explainer: Explainer, images: np.ndarray, targets: np.ndarray | None = None) -> np.ndarray:
    """Maps of noise seeded by each image's pixels: the same whatever the model is, and unrelated to it."""
    size = images.shape[-1]
    return np.stack([np.random.default_rng(int(im.sum())).random((size, size)) for im in images]).astype(np.float32)


@pytest.mark.parametrize("method", ["gradcam", "saliency", "integrated-gradients"])
def test_deletion_and_randomization_pass_for_each_method(explainer: Explainer, patch_model: dict, method: str) -> None:
    images = patch_model["images"]
    assert (explainer.predictor.logits(images).argmax(1) == patch_model["labels"]).mean() > 0.9
    deletion = deletion_test(explainer, images, method)
    assert deletion["margin"] >= 2.0, deletion  # the bar: 2 points more than greying a random 20%
    assert deletion["margin_vs_grain"] >= 2.0 and deletion["margin_vs_pixels"] >= 2.0, deletion  # other baselines
    assert deletion["margin_vs_other_image"] >= 2.0, deletion  # and about this image: the square moves
    assert deletion["resolution"] == list(explainer.resolution(method))
    assert deletion["resolution"][0] < 32 if method == "gradcam" else deletion["resolution"] == [32, 32]
    assert deletion["drop"] > deletion["centre_drop"], deletion
    randomized = randomization_check(explainer, images, method)
    assert randomized["spearman_mean"] < 0.5, randomized
    maps = explainer.maps(images, method)
    inside = (maps * patch_model["masks"]).sum((1, 2)) / patch_model["masks"].sum((1, 2))
    outside = (maps * ~patch_model["masks"]).sum((1, 2)) / (~patch_model["masks"]).sum((1, 2))
    # the maps point at the coloured square (plain gradients are noisy: they spread over the whole image)
    assert np.median(inside / np.maximum(outside, 1e-9)) > {"saliency": 1.15}.get(method, 2.0)


def test_deletion_baselines_shared_between_methods_give_the_same_figures(explainer: Explainer, patch_model: dict):
    images = patch_model["images"][:40]
    shared = DeletionBaselines(explainer.predictor, images)
    for method in ("gradcam", "saliency"):
        alone = deletion_test(explainer, images, method)
        assert deletion_test(explainer, images, method, baselines=shared) == pytest.approx(alone)
    # measured once: random regions, random pixels, the centre map
    assert len(shared.drops) == 3 and shared.before.shape == (40, 4)
    with pytest.raises(ValueError, match="not the images"):
        deletion_test(explainer, patch_model["images"][40:80], "saliency", baselines=shared)


def test_surrogate_maps_keep_the_power_spectrum_and_lose_the_places() -> None:
    rng = np.random.default_rng(0)
    maps = np.zeros((3, 32, 32), np.float32)
    maps[:, 10:18, 4:12] = 1.0  # one square blob each
    maps += 0.01 * rng.random((3, 32, 32), dtype=np.float32)
    twin = surrogate_maps(maps, seed=1)
    assert twin.shape == maps.shape and np.array_equal(twin, surrogate_maps(maps, seed=1))

    def power(m: np.ndarray) -> np.ndarray:
        return np.abs(np.fft.rfft2(m - m.mean(axis=(1, 2), keepdims=True)))

    assert np.allclose(power(twin), power(maps), rtol=1e-3, atol=1e-3)  # the same spatial structure
    inside = top_mask(twin)[:, 10:18, 4:12].mean()
    assert inside < 0.6 and not np.array_equal(top_mask(twin), top_mask(maps))  # its top is elsewhere
    noise = rng.random((200, 32, 32), dtype=np.float32)  # white noise stays white: no neighbour correlation
    flat = surrogate_maps(noise)
    corr = np.corrcoef(flat[:, :, :-1].ravel(), flat[:, :, 1:].ravel())[0, 1]
    assert abs(corr) < 0.05


def test_random_maps_at_a_coarser_resolution_are_smooth_upsampled_noise() -> None:
    pixels = random_maps(4, 32, seed=3)
    assert pixels.shape == (4, 32, 32) and np.array_equal(pixels, random_maps(4, 32, seed=3))
    assert np.ptp(random_maps(2, 32, resolution=(1, 1)), axis=(1, 2)).max() < 1e-6  # one value: a constant map
    coarse = random_maps(4, 32, seed=3, resolution=(4, 4))

    def step(m: np.ndarray) -> float:  # the mean difference of neighbouring pixels
        return float(np.abs(np.diff(m, axis=2)).mean())

    assert step(coarse) < step(pixels) / 5
    # its top 20% is a few regions, not scattered pixels: most greyed pixels have a greyed neighbour on the right
    mask = top_mask(coarse)
    assert (mask[:, :, :-1] & mask[:, :, 1:]).sum() / mask[:, :, :-1].sum() > 0.8
    assert (top_mask(pixels)[:, :, :-1] & top_mask(pixels)[:, :, 1:]).sum() / top_mask(pixels)[:, :, :-1].sum() < 0.4


def test_block_deletion_greys_whole_squares(explainer: Explainer, patch_model: dict) -> None:
    maps = np.zeros((1, 32, 32), np.float32)
    maps[0, 4:8, 8:12] = 1.0  # one hot 4x4 square, a warm pixel elsewhere
    maps[0, 30, 30] = 0.9
    blocks = in_blocks(maps, 4)
    assert np.allclose(blocks[0, 4:8, 8:12], 1.0, atol=1e-6) and np.isclose(blocks[0, 28, 28], 0.9 / 16, atol=1e-6)
    mask = top_mask(blocks, 32 / 1024)  # two squares' worth: the hot square, then the warm one
    assert mask[0, 4:8, 8:12].all() and mask[0, 28:32, 28:32].all() and mask.sum() == 32
    deletion = deletion_test(explainer, patch_model["images"], "gradcam", block=4)
    assert deletion["block"] == 4 and deletion["margin"] >= 2.0, deletion


def test_both_checks_fail_on_maps_of_noise(explainer: Explainer, patch_model: dict) -> None:
    images = patch_model["images"]
    deletion = deletion_test(explainer, images, "noise", maps=noise_maps(explainer, images))
    assert deletion["margin"] < 2.0 and deletion["resolution"] == [32, 32], deletion
    # noise with Grad-CAM's grain (its layer's h x w, upsampled alike) fails against random regions of that grain
    grain = explainer.resolution("gradcam")
    assert 1 < grain[0] < 32
    shared = DeletionBaselines(explainer.predictor, images)
    coarse = [
        deletion_test(
            explainer,
            images,
            "noise",
            maps=random_maps(len(images), 32, seed, grain),
            resolution=grain,
            baselines=shared,
        )
        for seed in (7, 8, 9, 10)  # a region covers the square or not: one seed is a coin toss, four average it
    ]
    assert np.mean([d["margin"] for d in coarse]) < 2.0 and coarse[0]["resolution"] == list(grain), coarse
    randomized = randomization_check(explainer, images, "noise", map_fn=noise_maps)
    assert randomized["spearman_mean"] > 0.99, randomized


def test_a_map_that_ignores_the_image_is_caught(explainer: Explainer, patch_model: dict) -> None:
    """The centre map, the same for every image: no better than the next image's map, and blind to the weights."""
    images = patch_model["images"]

    def centre(ex: Explainer, x: np.ndarray, targets: np.ndarray) -> np.ndarray:
        return np.broadcast_to(centre_map(32), (len(x), 32, 32)).copy()

    deletion = deletion_test(explainer, images, "centre", maps=centre(explainer, images, None), resolution=(32, 32))
    assert deletion["margin_vs_other_image"] == 0.0 and deletion["margin_vs_centre"] == 0.0, deletion
    assert randomization_check(explainer, images, "centre", map_fn=centre)["spearman_mean"] > 0.99


# --------------------------------------------------------------------------------------------------- the command


def _png_folder(images: np.ndarray, folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray(images[i].transpose(1, 2, 0)).save(p)
        paths.append(p)
    return paths


def test_explain_command_json_pngs_and_predicts_labels(
    patch_model: dict, explainer: Explainer, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    files = _png_folder(patch_model["images"], tmp_path / "in", 5)
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "maps"
    ck = str(patch_model["checkpoint"])
    assert main(["predict", ck, str(tmp_path / "in"), "--json", "--threads", "1"]) == 1
    predicted = {p["path"]: p for p in json.loads(capsys.readouterr().out)["predictions"]}
    rc = main(["explain", ck, str(tmp_path / "in"), "--out", str(out), "--method", "saliency", "--json"])
    captured = capsys.readouterr()
    assert rc == 1 and "1 of 6 inputs could not be explained" in captured.err
    result = json.loads(captured.out)
    assert [e["path"] for e in result["errors"]] == [str(tmp_path / "in" / "broken.png")]
    rows = result["explanations"]
    assert sorted(r["path"] for r in rows) == sorted(str(f) for f in files)
    for row in rows:
        assert {"path", "label", "probability", "method", "map"} <= set(row)
        assert row["label"] == predicted[row["path"]]["label"] and row["method"] == "saliency"
        assert row["probability"] == pytest.approx(predicted[row["path"]]["probability"], abs=1e-9)
        got = np.array(row["map"])
        image = np.asarray(Image.open(row["path"]).convert("RGB")).transpose(2, 0, 1)[None]
        assert got.shape == (32, 32) and np.allclose(got, explainer.maps(image, "saliency")[0], atol=1e-4)
        png = Image.open(row["png"])
        assert png.format == "PNG" and png.size[0] > 2 * png.size[1] / 2
    assert len(list(out.glob("*.png"))) == 5


def test_explain_for_another_class_and_plain_output(
    patch_model: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    files = _png_folder(patch_model["images"], tmp_path / "in", 2)
    ck = str(patch_model["checkpoint"])
    assert main(["explain", ck, str(files[0]), "--out", str(tmp_path / "o"), "--target-class", "b", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["explanations"][0]
    assert row["target"] == "b" and 0 <= row["target_probability"] <= 1
    assert main(["explain", ck, *map(str, files), "--out", str(tmp_path / "o2")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.endswith("-gradcam.png") for line in lines)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--layer", "nope"], "--layer 'nope': the model has no such module"),
        (["--layer", "fc2"], "does not output a spatial feature map"),
        (["--target-class", "zebra"], "--target-class 'zebra' is not one of the model's classes"),
    ],
)
def test_bad_explain_options_are_one_line(
    patch_model: dict, tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], fragment: str
) -> None:
    files = _png_folder(patch_model["images"], tmp_path / "in", 1)
    rc = main(["explain", str(patch_model["checkpoint"]), str(files[0]), "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and fragment in err[0], err
    assert not (tmp_path / "o").exists()
