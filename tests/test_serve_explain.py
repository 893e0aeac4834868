"""POST /explain on a real `cifar-cnn serve` (127.0.0.1, the tiny checkpoint): maps equal to the library's
`Explainer` on the same decoded image, the upload rules of /predict with one-line 4xx messages, its schema in the
OpenAPI document, no /explain for an ONNX model, and the web page's explain toggle drawing the API's map over the
image in headless Chromium, compared pixel by pixel with the overlay computed here."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
import pytest

from cifar_cnn.choices import EXPLAIN_METHODS
from cifar_cnn.cli import main
from cifar_cnn.explain import Explainer, overlay
from cifar_cnn.predict import Predictor

from .helpers import CHROMIUM, CHROMIUM_ARGS
from .model_fixtures import Server, real_test_tree, tiny_checkpoint
from .test_serve import _artifact

if TYPE_CHECKING:
    from playwright.sync_api import Browser

MAP_ROUNDING = 5e-5  # the API rounds map values to 4 decimals
ERROR = "#/components/schemas/ErrorMessage"
SERVER_OPTIONS = ("--threads", "1", "--max-upload-mb", "1", "--log-level", "warning")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="session")
def real_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real CIFAR-10 test JPEGs from the shared archive: ROOT/test/<class>/NNNN.jpg."""
    return real_test_tree(tmp_path_factory, per_class=100) / "test"


@pytest.fixture(scope="module")
def server(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("explain-server") / "serve.log"
    srv = Server(checkpoint, log, *SERVER_OPTIONS)
    yield srv
    srv.stop()
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def explainer(checkpoint: Path) -> Explainer:
    return Explainer(Predictor.from_checkpoint(checkpoint))


def post(url: str, data: bytes, name: str = "image.jpg", route: str = "explain", **params: object) -> httpx.Response:
    files = {"file": (name, data, "application/octet-stream")}
    return httpx.post(f"{url}/{route}", files=files, params=params, timeout=60)


def test_maps_equal_the_library_on_the_same_decoded_image(server: Server, explainer: Explainer, real_images: Path):
    data = (real_images / "cat" / "0000.jpg").read_bytes()
    image = explainer.predictor.decode(data, "0000.jpg")
    predicted = post(server.url, data, route="predict", top_k=3).json()
    size = explainer.size
    maps = {}
    for method in EXPLAIN_METHODS:
        r = post(server.url, data, "0000.jpg", method=method)
        assert r.status_code == 200, (method, r.text)
        got = r.json()
        want = explainer.explain(image[None], method)[0]
        assert got["filename"] == "0000.jpg" and got["method"] == method and got["input_size"] == size
        assert got["label"] == want["label"] == predicted["label"] == got["target"]
        assert [t["label"] for t in got["top_k"]] == [t["label"] for t in predicted["top_k"]]
        assert abs(got["probability"] - predicted["probability"]) < 1e-6
        assert got["target_probability"] == got["probability"]
        maps[method] = np.array(got["map"])
        assert maps[method].shape == (size, size) and maps[method].min() >= 0 and maps[method].max() == 1
        assert np.allclose(maps[method], want["map"], rtol=0, atol=MAP_ROUNDING + 1e-5), method
        assert np.array_equal(maps[method], np.round(maps[method], 4))  # rounded as documented
    assert not np.allclose(maps["gradcam"], maps["saliency"], atol=0.05)  # the method is not ignored

    # Another class, by name and by index: the map explains that class, with its probability.
    other = next(c for c in explainer.classes if c != predicted["label"])
    want = explainer.explain(image[None], "saliency", other)[0]
    by_name = post(server.url, data, method="saliency", target_class=other).json()
    by_index = post(server.url, data, method="saliency", target_class=explainer.classes.index(other)).json()
    for got in (by_name, by_index):
        assert got["target"] == other and got["label"] == predicted["label"]
        assert abs(got["target_probability"] - want["target_probability"]) < 1e-6
        assert np.allclose(got["map"], want["map"], rtol=0, atol=MAP_ROUNDING + 1e-5)
    assert not np.allclose(by_name["map"], maps["saliency"], atol=0.05)


def test_bad_requests_get_the_4xx_of_predict_with_a_one_line_message(server: Server, real_images: Path):
    jpeg = (real_images / "dog" / "0000.jpg").read_bytes()
    cases = {
        "empty": (post(server.url, b"", "empty.png"), 400, "empty.png: empty upload"),
        "text": (post(server.url, b"hello, I am not a picture", "notes.txt"), 422, "not a readable image"),
        "truncated": (post(server.url, jpeg[: len(jpeg) // 3], "cut.jpg"), 422, "truncated"),
        "oversized": (post(server.url, os.urandom(1024 * 1024 + 4096), "big.jpg"), 413, "upload too large"),
        "no file": (httpx.post(f"{server.url}/explain", data={"x": "1"}), 422, "file: no image file"),
        "bad method": (post(server.url, jpeg, method="lime"), 422, "method: Input should be 'gradcam'"),
        "unknown target": (post(server.url, jpeg, target_class="giraffe"), 422, "target_class 'giraffe' is not one"),
        "target out of range": (post(server.url, jpeg, target_class="10"), 422, "or an index 0..9"),
        "odd digit": (post(server.url, jpeg, target_class="\u00b2"), 422, "is not one of the model's classes"),
        "bad top_k": (post(server.url, jpeg, top_k=0), 422, "top_k"),
    }
    for name, (response, status, text) in cases.items():
        assert response.status_code == status, (name, response.text)
        detail = response.json()["detail"]
        assert isinstance(detail, str) and "\n" not in detail and text in detail, (name, detail)
        assert "--" not in detail, (name, detail)  # the API's words, not the command line's
    metrics = httpx.get(f"{server.url}/metrics").json()
    assert post(server.url, jpeg).status_code == 200  # and the server is fine afterwards
    after = httpx.get(f"{server.url}/metrics").json()
    assert after["explanations"] == metrics["explanations"] + 1 and after["rejected"]["422"] >= 7


def test_openapi_documents_explain_and_health_offers_it(server: Server):
    spec = httpx.get(f"{server.url}/openapi.json").json()
    operation = spec["paths"]["/explain"]["post"]
    schemas = {s: r["content"]["application/json"]["schema"]["$ref"] for s, r in operation["responses"].items()}
    assert schemas == {"200": "#/components/schemas/Explanation", **dict.fromkeys(("400", "413", "422", "503"), ERROR)}
    params = {p["name"]: p for p in operation["parameters"]}
    method = params["method"]["schema"]
    assert (method["type"], method["enum"], method["default"]) == ("string", list(EXPLAIN_METHODS), "gradcam")
    assert set(params) == {"method", "target_class", "top_k"} and params["top_k"]["schema"]["minimum"] == 1
    schema = spec["components"]["schemas"]["Explanation"]
    assert schema["properties"]["map"]["items"]["items"]["type"] == "number"
    assert set(schema["required"]) >= {"filename", "label", "probability", "top_k", "method", "target", "map"}
    health = httpx.get(f"{server.url}/health").json()
    assert health["explain"] is True and health["explain_methods"] == list(EXPLAIN_METHODS)


def test_onnx_model_is_served_without_explain(checkpoint: Path, real_images: Path, tmp_path: Path):
    onnx = tmp_path / "model.onnx"
    assert main(["export", str(checkpoint), "--format", "onnx", "--out", str(onnx), "--num-images", "20"]) == 0
    # Server puts its first argument where the checkpoint goes; `--onnx=FILE` is one token that argparse reads as the
    # option, so `serve --onnx=FILE --port N ...` is what runs.
    srv = Server(Path(f"--onnx={onnx}"), tmp_path / "serve.log", *SERVER_OPTIONS)
    try:
        jpeg = (real_images / "cat" / "0000.jpg").read_bytes()
        health = httpx.get(f"{srv.url}/health").json()
        assert health["backend"] == "onnxruntime" and health["explain"] is False and health["explain_methods"] == []
        assert post(srv.url, jpeg).status_code == 404
        assert post(srv.url, jpeg, route="predict").status_code == 200
        assert "/explain" not in httpx.get(f"{srv.url}/openapi.json").json()["paths"]
        with chromium() as browser:  # the page offers no explain toggle
            page = browser.new_page()
            page.goto(srv.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('seed_cnn')")
            assert not page.is_visible("#explain-controls") and not page.is_visible("#explain")
    finally:
        srv.stop()


def test_a_model_without_a_spatial_map_is_known_at_startup():
    """A model with no (N, C, h, w) feature map: /health leaves gradcam out, gradcam requests get a 422 that says
    what to use instead, and the other methods work (in-process app, a linear model on 8 x 8 images)."""
    from fastapi.testclient import TestClient
    from PIL import Image
    from torch import nn

    from cifar_cnn.serve.app import create_app

    linear = Predictor(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2)), ["a", "b"], (0.5,) * 3, (0.25,) * 3, 8)
    png = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(png, format="PNG")
    with TestClient(create_app(linear)) as client:
        assert client.get("/health").json()["explain_methods"] == ["saliency", "integrated-gradients"]
        files = {"file": ("x.png", png.getvalue(), "image/png")}
        refused = client.post("/explain", files=files)
        assert refused.status_code == 422 and "use method=saliency" in refused.json()["detail"], refused.text
        ok = client.post("/explain", files=files, params={"method": "saliency"})
        assert ok.status_code == 200 and np.array(ok.json()["map"]).shape == (8, 8), ok.text


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """Headless Chromium from /usr/bin/chromium, closed when the block ends."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install playwright (the [dev] extra; .ci/run installs it)")
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run installs it)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=60_000)
        try:
            yield browser
        finally:
            browser.close()


CANVAS_PIXELS = """() => {
  const c = document.getElementById('explain-overlay');
  return [c.width, c.height, Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data)];
}"""


def test_page_explain_toggle_draws_the_apis_map_over_the_image(
    server: Server, explainer: Explainer, real_images: Path, tmp_path: Path
):
    """Headless Chromium turns the toggle on and uploads a real test image; the canvas must hold the API's map in
    inferno colours blended over the image, as cifar_cnn.explain.overlay draws it, and not a mirrored map."""
    picked = real_images / "frog" / "0003.jpg"
    data = picked.read_bytes()
    api = post(server.url, data, picked.name, method="gradcam", top_k=5).json()
    heat = np.array(api["map"])
    image = explainer.predictor.decode(data, picked.name)
    shot = tmp_path / "serve-explain.png"
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 900, "height": 700})
        page.set_default_timeout(60_000)
        page.goto(server.url + "/")
        page.wait_for_selector("#explain-controls.show")
        assert page.eval_on_selector_all("#method option", "os => os.map(o => o.value)") == list(EXPLAIN_METHODS)
        page.check("#explain")
        page.select_option("#method", "gradcam")
        page.set_input_files("#file", str(picked))
        page.wait_for_selector("body[data-state=done]")
        assert page.is_visible("#explain-overlay")
        assert page.inner_text("#top1") == api["label"] and page.locator("#rows .row").count() == 5
        assert page.inner_text("#explain-caption") == f"gradcam for {api['target']}"
        width, height, pixels = page.evaluate(CANVAS_PIXELS)
        page.locator("#result").screenshot(path=str(shot))
    canvas = np.array(pixels, dtype=np.float64).reshape(height, width, 4)
    assert (width, height) == (explainer.size, explainer.size) and (canvas[..., 3] == 255).all()

    def error(m: np.ndarray) -> float:
        return float(np.abs(canvas[..., :3] - overlay(image, m)).mean())

    right, mirrored = error(heat), error(heat[:, ::-1])
    # The browser decodes the JPEG itself (under a level of difference here), against tens for a misplaced map.
    assert right < 1.0, right
    assert mirrored > 4 * right + 5, (right, mirrored)
    luminance = canvas[..., :3].mean(-1) - 0.45 * image.transpose(1, 2, 0).mean(-1)  # the map's share of the pixel
    assert np.corrcoef(luminance.ravel(), heat.ravel())[0, 1] > 0.9
    assert shot.stat().st_size > 2000
    _artifact(shot)
