"""`--data cifar10`: download from a real HTTP server on 127.0.0.1, md5 check, extraction; no-network message."""

from __future__ import annotations

import functools
import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest

from cifar_cnn.data import load_dataset
from cifar_cnn.data.download import MD5_ENV, URL_ENV
from cifar_cnn.errors import CifarCnnError

from .conftest import make_tar, run_cli


@pytest.fixture
def server(tmp_path: Path, official_dir: Path):
    """A real HTTP server on a free port of 127.0.0.1 serving cifar-10-python.tar.gz; stopped after the test."""
    root = tmp_path / "www"
    root.mkdir()
    archive = make_tar(official_dir, root / "cifar-10-python.tar.gz")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}/cifar-10-python.tar.gz"
    yield url, hashlib.md5(archive.read_bytes()).hexdigest()
    httpd.shutdown()
    httpd.server_close()


def test_download_good_md5(server, data_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, md5 = server
    monkeypatch.setenv(URL_ENV, url)
    monkeypatch.setenv(MD5_ENV, md5)
    ds = load_dataset("cifar10", log=lambda m: None)
    assert ds.train_images.shape == (600, 3, 32, 32)
    assert (data_home / "cifar-10-batches-py" / "data_batch_5").is_file()
    # second time: no network needed (server gone is simulated by a bad URL)
    monkeypatch.setenv(URL_ENV, "http://127.0.0.1:9/none")
    assert load_dataset("cifar10", log=lambda m: None).test_images.shape == (200, 3, 32, 32)


def test_download_bad_md5_leaves_nothing(server, data_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = server
    monkeypatch.setenv(URL_ENV, url)
    monkeypatch.setenv(MD5_ENV, "0" * 32)
    with pytest.raises(CifarCnnError, match="md5"):
        load_dataset("cifar10", log=lambda m: None)
    assert not (data_home / "cifar-10-batches-py").exists()
    assert not list(data_home.glob("cifar-10-python.tar.gz*"))


def test_official_md5_is_the_default(server, monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = server
    monkeypatch.setenv(URL_ENV, url)
    monkeypatch.delenv(MD5_ENV, raising=False)
    with pytest.raises(CifarCnnError, match="expected c58f30108f718f92721af3b95e74349a"):
        load_dataset("cifar10", log=lambda m: None)


def test_no_network_says_what_to_do(data_home: Path) -> None:
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = run_cli("data", env={URL_ENV: f"http://127.0.0.1:{port}/cifar-10-python.tar.gz"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "could not download" in proc.stderr and "--data" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
