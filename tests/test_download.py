"""`--data cifar10` and CIFAR-100: download from a real HTTP server on 127.0.0.1, md5 check, extraction; no-network
message."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import os
import socket
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cifar_cnn.data import load_dataset
from cifar_cnn.data.download import (
    ARCHIVE_NAME,
    CIFAR10,
    CIFAR100,
    MD5_ENV,
    NO_NETWORK_HINT,
    OFFICIAL_MD5,
    OFFICIAL_URL,
    URL_ENV,
    ensure_cifar10,
    ensure_cifar100,
)
from cifar_cnn.data.sources import CIFAR100_DIRNAME, OFFICIAL_DIRNAME, read_cifar100_folder
from cifar_cnn.errors import CifarCnnError

from .conftest import make_tar, run_cli
from .data_writers import Cifar100Written, write_cifar100


@contextlib.contextmanager
def serving(root: Path) -> Iterator[str]:
    """A real HTTP server on a free port of 127.0.0.1 serving the files of `root`; yields its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def dead_url(name: str) -> str:
    """A URL on 127.0.0.1 where nobody listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


@pytest.fixture
def server(tmp_path: Path, official_dir: Path):
    """cifar-10-python.tar.gz served over HTTP from 127.0.0.1: (url, md5); stopped after the test."""
    root = tmp_path / "www"
    root.mkdir()
    archive = make_tar(official_dir, root / "cifar-10-python.tar.gz")
    with serving(root) as base:
        yield f"{base}/cifar-10-python.tar.gz", hashlib.md5(archive.read_bytes()).hexdigest()


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
    proc = run_cli("data", env={URL_ENV: dead_url("cifar-10-python.tar.gz")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "could not download" in proc.stderr and "--data" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cifar10_offline_message_names_the_set_and_the_mirror_variable(data_home: Path, monkeypatch) -> None:
    monkeypatch.setenv(URL_ENV, dead_url("cifar-10-python.tar.gz"))
    with pytest.raises(CifarCnnError) as info:
        ensure_cifar10(data_home, log=lambda m: None)
    message = str(info.value)
    assert message.startswith("could not download CIFAR-10 from") and f"${URL_ENV}" in message
    assert NO_NETWORK_HINT in message and "CIFAR-100" not in message and len(message.splitlines()) == 1


def test_the_old_names_are_the_cifar10_spec() -> None:
    """Code that imports the CIFAR-10 constants gets what the shared code path uses."""
    assert (CIFAR10.url, CIFAR10.md5, CIFAR10.url_env, CIFAR10.md5_env, CIFAR10.archive_name, CIFAR10.dirname) == (
        OFFICIAL_URL,
        OFFICIAL_MD5,
        URL_ENV,
        MD5_ENV,
        ARCHIVE_NAME,
        OFFICIAL_DIRNAME,
    )
    assert CIFAR100.url == "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    assert CIFAR100.md5 == "eb9058c3a382ffc7106e4002c42a8d85"
    assert (CIFAR100.url_env, CIFAR100.md5_env) == ("CIFAR_CNN_CIFAR100_URL", "CIFAR_CNN_CIFAR100_MD5")
    assert set(CIFAR100.required_files) == {"train", "test", "meta"}


# --------------------------------------------------------------------------------------------------------------------
# CIFAR-100


def home_is_clean(home: Path) -> bool:
    """Nothing half-written: no extracted folder, no archive, no temporary file or extraction folder."""
    return not home.exists() or sorted(p.name for p in home.iterdir()) == []


@pytest.fixture
def c100_server(tmp_path: Path) -> Iterator[tuple[str, str, Cifar100Written]]:
    """cifar-100-python.tar.gz served over HTTP from 127.0.0.1: (url, md5, what was written)."""
    root = tmp_path / "www100"
    written = write_cifar100(root / "cifar-100-python.tar.gz", seed=3)
    with serving(root) as base:
        yield f"{base}/cifar-100-python.tar.gz", hashlib.md5(written.path.read_bytes()).hexdigest(), written


def test_cifar100_download_good_md5(c100_server, data_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, md5, written = c100_server
    monkeypatch.setenv(CIFAR100.url_env, url)
    monkeypatch.setenv(CIFAR100.md5_env, md5)
    monkeypatch.setenv(URL_ENV, dead_url("cifar-10-python.tar.gz"))  # the CIFAR-10 variables play no part
    messages: list[str] = []
    folder = ensure_cifar100(data_home, log=messages.append)
    assert folder == data_home / CIFAR100_DIRNAME
    assert sorted(p.name for p in folder.iterdir()) == ["file.txt~", "meta", "test", "train"]
    with tarfile.open(written.path) as tf:  # extracted byte for byte
        for name in ("train", "test", "meta"):
            assert (folder / name).read_bytes() == tf.extractfile(f"cifar-100-python/{name}").read()
    assert any("CIFAR-100" in m and url in m for m in messages)
    assert sorted(p.name for p in data_home.iterdir()) == ["cifar-100-python", "cifar-100-python.tar.gz"]
    ds = read_cifar100_folder(folder, "coarse")
    assert ds.classes == written.coarse_names and len(ds.train_labels) == 200
    # second time: nothing fetched (the server is replaced by a dead URL)
    monkeypatch.setenv(CIFAR100.url_env, dead_url("cifar-100-python.tar.gz"))
    messages.clear()
    assert ensure_cifar100(data_home, log=messages.append) == folder and messages == []


def test_cifar100_archive_already_in_home_is_extracted_without_network(
    tmp_path: Path, data_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = write_cifar100(data_home / "cifar-100-python.tar.gz")
    monkeypatch.setenv(CIFAR100.url_env, dead_url("cifar-100-python.tar.gz"))
    monkeypatch.setenv(CIFAR100.md5_env, hashlib.md5(written.path.read_bytes()).hexdigest())
    folder = ensure_cifar100(data_home, log=lambda m: None)
    assert read_cifar100_folder(folder).classes == written.fine_names


def test_cifar100_bad_md5_leaves_nothing(c100_server, data_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, _, _ = c100_server
    monkeypatch.setenv(CIFAR100.url_env, url)
    monkeypatch.setenv(CIFAR100.md5_env, "0" * 32)
    with pytest.raises(CifarCnnError, match="md5") as info:
        ensure_cifar100(data_home, log=lambda m: None)
    message = str(info.value)
    assert "not CIFAR-100" in message and "$CIFAR_CNN_CIFAR100_URL" in message and "CIFAR-10;" not in message
    assert home_is_clean(data_home)


def test_cifar100_official_md5_is_the_default(c100_server, data_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url, _, _ = c100_server
    monkeypatch.setenv(CIFAR100.url_env, url)
    monkeypatch.delenv(CIFAR100.md5_env, raising=False)
    monkeypatch.setenv(MD5_ENV, "0" * 32)  # the CIFAR-10 md5 variable is not consulted
    with pytest.raises(CifarCnnError, match="expected eb9058c3a382ffc7106e4002c42a8d85"):
        ensure_cifar100(data_home, log=lambda m: None)
    assert home_is_clean(data_home)


def test_cifar100_offline_says_what_to_do(data_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CIFAR100.url_env, dead_url("cifar-100-python.tar.gz"))
    with pytest.raises(CifarCnnError) as info:
        ensure_cifar100(data_home, log=lambda m: None)
    message = str(info.value)
    assert message.startswith("could not download CIFAR-100 from http://127.0.0.1:")
    assert "$CIFAR_CNN_CIFAR100_URL" in message and "cifar-100-python.tar.gz" in message
    assert "cifar-100-python/ folder" in message and "--data" in message and "cifar-10-" not in message
    assert len(message.splitlines()) == 1
    assert home_is_clean(data_home)


def _serve_archive(root: Path, build) -> Path:
    archive = root / "cifar-100-python.tar.gz"
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w:gz") as tf:
        build(tf)
    return archive


@pytest.mark.parametrize("problem", ["unsafe-member", "missing-meta"])
def test_cifar100_bad_archive_extracts_nothing(
    tmp_path: Path, data_home: Path, monkeypatch: pytest.MonkeyPatch, problem: str
) -> None:
    """An archive with the right md5 (a mirror's own) but an unsafe member, or without meta: an error, and neither a
    cifar-100-python/ folder, nor an extraction folder, nor a file outside the home is left."""
    src = write_cifar100(tmp_path / "src" / CIFAR100_DIRNAME).path

    def build(tf: tarfile.TarFile) -> None:
        for name in ("train", "test", "meta"):
            if not (problem == "missing-meta" and name == "meta"):
                tf.add(src / name, arcname=f"{CIFAR100_DIRNAME}/{name}")
        if problem == "unsafe-member":
            tf.add(src / "meta", arcname=f"{CIFAR100_DIRNAME}/../../escape")

    archive = _serve_archive(tmp_path / "www", build)
    with serving(archive.parent) as base:
        monkeypatch.setenv(CIFAR100.url_env, f"{base}/{archive.name}")
        monkeypatch.setenv(CIFAR100.md5_env, hashlib.md5(archive.read_bytes()).hexdigest())
        fragment = "refusing archive member" if problem == "unsafe-member" else "does not contain cifar-100-python/"
        with pytest.raises(CifarCnnError, match=fragment):
            ensure_cifar100(data_home, log=lambda m: None)
    assert not (data_home / CIFAR100_DIRNAME).exists()
    assert [p.name for p in data_home.iterdir()] == ["cifar-100-python.tar.gz"]  # the checked download is kept
    assert not (tmp_path / "escape").exists() and not (data_home.parent / "escape").exists()
    assert "escape" not in os.listdir(tmp_path)
