"""The HTTP server, started for real (`python -m cifar_cnn serve` on a free loopback port) and called over HTTP:
predictions equal to the library's, 4xx with a message for every bad upload, micro-batching visible in /metrics,
the web page driven by headless Chromium, and (with --runslow) a bounded load test."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import struct
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from cifar_cnn.predict import Predictor
from cifar_cnn.serve.app import MicroBatcher

from .helpers import CHROMIUM, CHROMIUM_ARGS
from .model_fixtures import Server, real_test_tree, tiny_checkpoint


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="session")
def real_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real CIFAR-10 test JPEGs from the shared archive: ROOT/test/<class>/NNNN.jpg."""
    return real_test_tree(tmp_path_factory, per_class=100) / "test"


@pytest.fixture(scope="module")
def server(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # A 1 MiB upload limit keeps the oversize test small; 50 ms of collecting makes batching easy to observe.
    log = tmp_path_factory.mktemp("server") / "serve.log"
    srv = Server(
        checkpoint, log, "--threads", "1", "--max-upload-mb", "1", "--max-wait-ms", "50", "--log-level", "warning"
    )
    yield srv
    srv.stop()


def post_image(url: str, data: bytes, name: str = "image.jpg", **params: object) -> httpx.Response:
    return httpx.post(
        f"{url}/predict", files={"file": (name, data, "application/octet-stream")}, params=params, timeout=30
    )


def test_health_docs_and_prediction_equal_to_the_library(server: Server, checkpoint: Path, real_images: Path):
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["model"] == "seed_cnn" and len(health["classes"]) == 10
    # /docs and /redoc load their scripts from a CDN (blank offline): off unless --docs (test_serve_hostile.py)
    assert httpx.get(f"{server.url}/docs").status_code == httpx.get(f"{server.url}/redoc").status_code == 404
    assert "/predict" in httpx.get(f"{server.url}/openapi.json").json()["paths"]
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html") and 'id="file"' in page.text

    files = sorted(real_images.glob("*/0000.jpg"))
    want = Predictor.from_checkpoint(checkpoint).predict_files(files, top_k=3).predictions
    for f, w in zip(files, want):
        r = post_image(server.url, f.read_bytes(), f.name, top_k=3)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["filename"] == f.name and got["label"] == w["label"]
        assert [t["label"] for t in got["top_k"]] == [t["label"] for t in w["top_k"]]
        assert np.allclose([t["probability"] for t in got["top_k"]], [t["probability"] for t in w["top_k"]], atol=1e-6)
    all_k = post_image(server.url, files[0].read_bytes(), top_k=50).json()["top_k"]  # clamped to the classes
    assert len(all_k) == 10 and abs(sum(t["probability"] for t in all_k) - 1) < 1e-6


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels followed by a tiny IDAT: a decompression-bomb stand-in."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_bad_uploads_get_4xx_with_a_message(server: Server, real_images: Path):
    jpeg = next(real_images.glob("cat/*.jpg")).read_bytes()
    cases = {
        "text": (post_image(server.url, b"hello, I am not a picture", "notes.txt"), 422, "not a readable image"),
        "empty": (post_image(server.url, b"", "empty.png"), 400, "empty upload"),
        "truncated": (post_image(server.url, jpeg[: len(jpeg) // 3], "cut.jpg"), 422, "truncated"),
        "bomb": (post_image(server.url, png_header_only(8000, 8000), "bomb.png"), 422, "decompression bomb"),
        "huge bomb": (post_image(server.url, png_header_only(30000, 30000), "b.png"), 422, "DecompressionBomb"),
        "oversized": (post_image(server.url, os.urandom(1024 * 1024 + 4096), "big.jpg"), 413, "upload too large"),
        "no file": (httpx.post(f"{server.url}/predict", data={"x": "1"}), 422, "file"),
        "bad top_k": (post_image(server.url, jpeg, top_k=0), 422, "top_k"),
    }
    for name, (response, status, text) in cases.items():
        assert response.status_code == status, (name, response.text)
        detail = response.json()["detail"]
        assert text in (detail if isinstance(detail, str) else json.dumps(detail)), (name, detail)
    chunked = httpx.post(  # no Content-Length: the limit applies while the body streams in
        f"{server.url}/predict",
        content=iter([b"--x\r\nContent-Disposition: form-data; name=file; filename=a\r\n\r\n"] + [b"0" * 65536] * 20),
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert 400 <= chunked.status_code < 500 and "too large" in chunked.text
    assert post_image(server.url, jpeg).status_code == 200  # and the server is fine afterwards
    rejected = httpx.get(f"{server.url}/metrics").json()["rejected"]
    assert rejected["422"] >= 4 and rejected["413"] >= 2 and rejected["400"] >= 1


def test_concurrent_requests_share_forward_passes(server: Server, real_images: Path):
    before = httpx.get(f"{server.url}/metrics").json()
    images = [f.read_bytes() for f in sorted(real_images.glob("*/000[0-3].jpg"))]  # 40 images
    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(lambda data: post_image(server.url, data), images))
    assert [r.status_code for r in responses] == [200] * len(images)
    after = httpx.get(f"{server.url}/metrics").json()
    assert after["predictions"] - before["predictions"] == len(images)
    new = {int(k): v - before["batch_sizes"].get(k, 0) for k, v in after["batch_sizes"].items()}
    assert sum(size * count for size, count in new.items()) == len(images)  # every image in exactly one batch
    assert max(size for size, count in new.items() if count) > 1, after["batch_sizes"]


def test_micro_batcher_groups_waiting_requests_and_caps_the_batch():
    calls: list[int] = []

    def logits(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return batch.reshape(len(batch), -1)[:, :2].astype(np.float32)

    async def scenario() -> list[np.ndarray]:
        batcher = MicroBatcher(logits, max_batch=4, max_wait_ms=20)
        await batcher.start()
        try:
            images = [np.full((3, 2, 2), i, np.uint8) for i in range(10)]
            return await asyncio.gather(*(batcher.submit(im) for im in images))
        finally:
            await batcher.stop()

    results = asyncio.run(scenario())
    assert [int(r[0]) for r in results] == list(range(10))  # each request gets its own row back
    assert sum(calls) == 10 and max(calls) == 4 and len(calls) == 3


def _artifact(path: Path) -> None:
    folder = os.environ.get("CIFAR_CNN_ARTIFACTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(folder) / path.name)


def test_web_page_shows_the_same_top1_as_the_api(server: Server, real_images: Path, tmp_path: Path):
    """Headless Chromium picks a real CIFAR-10 test image on the page, and the page's top-1 must be the API's."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install playwright (the [dev] extra; .ci/run installs it)")
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run installs it)")
    picked, dropped = real_images / "cat" / "0000.jpg", real_images / "ship" / "0001.jpg"
    api = {f.name: post_image(server.url, f.read_bytes(), f.name).json() for f in (picked, dropped)}
    shot = tmp_path / "serve-page.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 700})
            page.set_default_timeout(30_000)
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('seed_cnn')")
            page.set_input_files("#file", str(picked))
            page.wait_for_selector("body[data-state=done]")
            assert page.inner_text("#top1") == api[picked.name]["label"]
            bars = page.locator("#rows .row")
            assert bars.count() == 5
            assert [bars.nth(i).get_attribute("data-label") for i in range(5)] == [
                t["label"] for t in api[picked.name]["top_k"]
            ]
            assert page.evaluate("document.getElementById('preview').naturalWidth") == 32  # the image is shown
            page.screenshot(path=str(shot), full_page=True)

            # Drag and drop: a DataTransfer holding the second file, dropped on the drop zone.
            page.evaluate("document.body.dataset.state = ''")
            data = list(dropped.read_bytes())
            transfer = page.evaluate_handle(
                "([bytes, name]) => { const dt = new DataTransfer();"
                " dt.items.add(new File([new Uint8Array(bytes)], name, {type: 'image/jpeg'})); return dt; }",
                [data, dropped.name],
            )
            page.dispatch_event("#drop", "drop", {"dataTransfer": transfer})
            page.wait_for_selector("body[data-state=done]")
            assert page.inner_text("#top1") == api[dropped.name]["label"]
        finally:
            browser.close()
    assert shot.stat().st_size > 5000
    _artifact(shot)


@pytest.mark.slow
def test_load_2000_requests_at_concurrency_16(checkpoint: Path, real_images: Path, tmp_path: Path):
    """2,000 uploads of real test JPEGs, 16 in flight at a time, over loopback: no errors; prints and stores p50/p99
    latency and throughput (LOAD_RESULT.json in the test's folder and in $CIFAR_CNN_ARTIFACTS if set)."""
    total, concurrency = 2000, 16
    images = [(f.name, f.read_bytes()) for f in sorted(real_images.glob("*/*.jpg"))]
    srv = Server(checkpoint, tmp_path / "serve.log", "--log-level", "warning")
    latencies: list[float] = []
    statuses: list[int] = []

    async def worker(client: httpx.AsyncClient, queue: asyncio.Queue) -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            name, data = images[i % len(images)]
            t0 = time.perf_counter()
            try:
                r = await client.post("/predict", files={"file": (name, data, "image/jpeg")})
                statuses.append(r.status_code)
            except httpx.HTTPError:
                statuses.append(-1)
            latencies.append(time.perf_counter() - t0)

    async def run() -> float:
        queue: asyncio.Queue = asyncio.Queue()
        for i in range(total):
            queue.put_nowait(i)
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=srv.url, timeout=30, limits=limits) as client:
            await client.post("/predict", files={"file": images[0]})  # warm-up
            t0 = time.perf_counter()
            await asyncio.gather(*(worker(client, queue) for _ in range(concurrency)))
            return time.perf_counter() - t0

    try:
        elapsed = asyncio.run(run())
        metrics = httpx.get(f"{srv.url}/metrics").json()
    finally:
        srv.stop()
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    result = {
        "requests": total,
        "concurrency": concurrency,
        "errors": sum(s != 200 for s in statuses),
        "p50_ms": round(1000 * q[49], 2),
        "p99_ms": round(1000 * q[98], 2),
        "throughput_rps": round(total / elapsed, 1),
        "seconds": round(elapsed, 2),
        "batch_sizes": metrics["batch_sizes"],
        "cpu_count": os.cpu_count(),
    }
    print("load test:", json.dumps(result))
    (tmp_path / "LOAD_RESULT.json").write_text(json.dumps(result, indent=2))
    _artifact(tmp_path / "LOAD_RESULT.json")
    assert result["errors"] == 0 and len(statuses) == total


def test_non_finite_outputs_are_a_422_never_nan_or_null(checkpoint: Path, real_images: Path, tmp_path: Path):
    """A checkpoint whose finite weights overflow (fully connected weights x 1e38): /predict and /explain answer 422
    with one line naming the upload, never NaN (invalid JSON) or null probabilities, and the server stays up."""
    from .test_predict import overflowing_checkpoint

    srv = Server(overflowing_checkpoint(checkpoint, tmp_path), tmp_path / "serve.log", "--log-level", "warning")
    try:
        image = next(real_images.glob("cat/*.jpg")).read_bytes()
        for route in ("predict", "explain"):
            response = httpx.post(f"{srv.url}/{route}", files={"file": ("cat.jpg", image)}, timeout=60)
            assert response.status_code == 422, response.text
            detail = response.json()["detail"]
            assert detail.startswith("cat.jpg: ") and "non-finite outputs" in detail and "\n" not in detail, detail
        assert httpx.get(f"{srv.url}/health", timeout=10).json()["status"] == "ok"
    finally:
        srv.stop()
    assert "Traceback" not in (tmp_path / "serve.log").read_text()
