"""`--model hf:ORG/NAME` downloading from a hub: a real HTTP server on 127.0.0.1 speaking the part of the Hugging Face
hub protocol that huggingface_hub's snapshot_download uses (repo info, file tree, resolve), pointed at with
HF_ENDPOINT. The download fills a fresh HF_HUB_CACHE, which then serves the same model with HF_HUB_OFFLINE=1."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from .conftest import make_images, run_cli, write_official_batches

transformers = pytest.importorskip("transformers", reason="the [pretrained] extra is part of [all]")

REPO = "test-org/tiny-resnet"
REVISION = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(ThreadingHTTPServer):
    """Serves the files of one folder as the hub repository REPO at REVISION; records the paths asked for."""

    def __init__(self, folder: Path) -> None:
        super().__init__(("127.0.0.1", 0), _HubHandler)
        self.folder, self.requests = folder, []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _HubHandler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._answer(head=False)

    def do_HEAD(self) -> None:
        self._answer(head=True)

    def _answer(self, head: bool) -> None:
        path = self.path.split("?")[0]
        self.server.requests.append(f"{self.command} {path}")
        files = sorted(f for f in self.server.folder.iterdir() if f.is_file())
        if path in (f"/api/models/{REPO}", f"/api/models/{REPO}/revision/main"):
            siblings = [{"rfilename": f.name} for f in files]
            return self._send(200, json.dumps({"id": REPO, "sha": REVISION, "siblings": siblings}).encode(), head)
        if path.startswith(f"/api/models/{REPO}/tree/"):
            tree = [{"type": "file", "path": f.name, "size": f.stat().st_size, "oid": _sha1(f)} for f in files]
            return self._send(200, json.dumps(tree).encode(), head)
        prefix = f"/{REPO}/resolve/{REVISION}/"
        if path.startswith(prefix) and (self.server.folder / path[len(prefix) :]).is_file():
            body = (self.server.folder / path[len(prefix) :]).read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest() + '"'
            return self._send(200, body, head, {"X-Repo-Commit": REVISION, "ETag": etag}, "application/octet-stream")
        return self._send(404, b'{"error": "Repository not found"}', head, {"X-Error-Code": "RepoNotFound"})

    def _send(
        self, code: int, body: bytes, head: bool, headers: dict | None = None, kind: str = "application/json"
    ) -> None:
        self.send_response(code)
        for key, value in {"Content-Type": kind, **(headers or {})}.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)


def _sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    """The hub, serving a tiny random ResNet saved with save_pretrained, plus the files a hub repository also has
    that cifar-cnn must not download (other frameworks' weights)."""
    folder = tmp_path_factory.mktemp("hub-repo")
    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    transformers.ResNetForImageClassification(config).save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    (folder / "tf_model.h5").write_bytes(b"not for torch")
    (folder / "README.md").write_text("a model card")
    server = FakeHub(folder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hub-data")
    x, y = make_images(12, seed=1)
    return write_official_batches(root / "cifar-10-batches-py", x, y, x[:40], y[:40])


def _train(data: Path, out: Path, env: dict[str, str], model: str = f"hf:{REPO}") -> object:
    return run_cli(
        "train", "--model", model, "--data", str(data), "--out", str(out), "--epochs", "1", "--batch-size", "32",
        "--device", "cpu", "--precision", "fp32", "--threads", "1", "--no-report", "--no-progress",
        env={**env, "CIFAR_CNN_HOME": str(out.parent / "home")},
    )  # fmt: skip


def test_a_hub_model_downloads_once_then_trains_offline(hub: FakeHub, tiny_data: Path, tmp_path: Path) -> None:
    cache = tmp_path / "hf-cache"
    online = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "0"}
    done = _train(tiny_data, tmp_path / "online", online)
    assert done.returncode == 0, done.stderr[-2000:]
    fetched = {r.rsplit("/", 1)[1] for r in hub.requests if r.startswith("GET") and "/resolve/" in r}
    assert fetched == {"config.json", "preprocessor_config.json", "model.safetensors"}  # no tf_model.h5, no card
    snapshot = cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / REVISION
    assert (snapshot / "model.safetensors").is_file()

    # the cached weights are what the run started from: its body equals the served model's
    served = transformers.ResNetForImageClassification.from_pretrained(hub.folder).state_dict()
    hub.requests.clear()
    offline = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    again = run_cli(
        "train", "--model", f"hf:{REPO}", "--data", str(tiny_data), "--out", str(tmp_path / "offline"), "--epochs",
        "1", "--lr", "1e-30", "--device", "cpu", "--precision", "fp32", "--threads", "1", "--no-report",
        "--no-progress", env={**offline, "CIFAR_CNN_HOME": str(tmp_path / "home")},
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert hub.requests == []  # offline: the server is never asked
    ckpt = torch.load(tmp_path / "offline" / "best.pt", weights_only=True)
    body = {k[len("net.") :]: v for k, v in ckpt["model_state"].items() if not k.startswith("net.classifier")}
    for key, value in body.items():
        if "num_batches_tracked" not in key and "running_" not in key:
            torch.testing.assert_close(value, served[key], rtol=0, atol=1e-12)
    assert ckpt["model"]["hf"]["source"] == REPO and ckpt["mean"] == [0.5] * 3


def test_an_unknown_repository_is_one_line_naming_it(hub: FakeHub, tiny_data: Path, tmp_path: Path) -> None:
    env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_CACHE": str(tmp_path / "c"), "HF_HUB_OFFLINE": "0"}
    done = _train(tiny_data, tmp_path / "run", env, model="hf:test-org/no-such-model")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "no such model on the Hugging Face hub ('test-org/no-such-model')" in lines[0]
    assert not (tmp_path / "run").exists()
